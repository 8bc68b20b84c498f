//! Causal attention of one segment, forward (keeping the probabilities) and backward, on host
//! f32 buffers, one head per rayon task and its products through `tandem_kernels::matmul`.
//!
//! Layouts: queries and their gradients [len, heads · hd] (row stride `qd`); keys and values of
//! the whole context — the positions before the segment, then its own — [ctx, kv heads · hd]
//! (row stride `kvd`). Query head h reads key/value head h / (heads / kv heads).

use rayon::prelude::*;
use tandem_kernels::matmul::{gemm, Mat};
use tandem_kernels::vexp::exp_in_place;

/// A segment's shape: `len` query rows at positions `start..start + len`, over `start + len`
/// keys (causal, optionally within a sliding window).
#[derive(Clone, Copy, Debug)]
pub(super) struct Shape {
    pub len: usize,
    pub start: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
    pub window: Option<usize>,
    pub scale: f32,
}

impl Shape {
    pub fn ctx(&self) -> usize {
        self.start + self.len
    }
    fn qd(&self) -> usize {
        self.heads * self.hd
    }
    fn kvd(&self) -> usize {
        self.kv_heads * self.hd
    }
    fn kv_head(&self, h: usize) -> usize {
        h / (self.heads / self.kv_heads).max(1)
    }
    /// The keys query row i may see: `first..=pos`.
    fn visible(&self, i: usize) -> (usize, usize) {
        let pos = self.start + i;
        let first = self.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        (first, pos)
    }
}

/// Softmax attention: returns the output [len, qd] and, per head, the probabilities
/// [len, ctx] (zero outside what a row may see).
pub(super) fn forward(s: Shape, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<Vec<f32>>) {
    let (len, ctx, hd, qd, kvd) = (s.len, s.ctx(), s.hd, s.qd(), s.kvd());
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..s.heads)
        .into_par_iter()
        .map(|h| {
            let kh = s.kv_head(h);
            let mut p = vec![0f32; len * ctx];
            gemm(
                &mut p,
                ctx,
                false,
                Mat::strided(&q[h * hd..], len, hd, qd),
                Mat::strided(&k[kh * hd..], ctx, hd, kvd).t(),
                s.scale,
            );
            for (i, row) in p.chunks_mut(ctx).enumerate() {
                let (first, last) = s.visible(i);
                let seen = &mut row[first..=last];
                let max = seen.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                seen.iter_mut().for_each(|x| *x -= max);
                exp_in_place(seen);
                let sum: f32 = seen.iter().sum();
                for x in seen.iter_mut() {
                    *x /= sum;
                }
                row[..first].fill(0.0);
                row[last + 1..].fill(0.0);
            }
            let mut o = vec![0f32; len * hd];
            gemm(
                &mut o,
                hd,
                false,
                Mat::new(&p, len, ctx),
                Mat::strided(&v[kh * hd..], ctx, hd, kvd),
                1.0,
            );
            (o, p)
        })
        .collect();
    let mut out = vec![0f32; len * qd];
    let mut probs = Vec::with_capacity(s.heads);
    for (h, (o, p)) in per_head.into_iter().enumerate() {
        for (i, row) in o.chunks(hd).enumerate() {
            out[i * qd + h * hd..][..hd].copy_from_slice(row);
        }
        probs.push(p);
    }
    (out, probs)
}

/// What `backward` gives: dQ [len, qd], and dK, dV over the whole context [ctx, kvd].
pub(super) struct Grads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

/// The backward of `forward` for the output gradient `d_o` [len, qd].
pub(super) fn backward(
    s: Shape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[Vec<f32>],
    d_o: &[f32],
) -> Grads {
    let (len, ctx, hd, qd, kvd) = (s.len, s.ctx(), s.hd, s.qd(), s.kvd());
    let per_head: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..s.heads)
        .into_par_iter()
        .map(|h| {
            let kh = s.kv_head(h);
            let p = &probs[h];
            let d_oh = Mat::strided(&d_o[h * hd..], len, hd, qd);
            let mut dv = vec![0f32; ctx * hd];
            gemm(&mut dv, hd, false, Mat::new(p, len, ctx).t(), d_oh, 1.0);
            // dP = dO · Vᵀ, then dS = P ⊙ (dP − Σ_j P dP) row by row.
            let mut ds = vec![0f32; len * ctx];
            gemm(
                &mut ds,
                ctx,
                false,
                d_oh,
                Mat::strided(&v[kh * hd..], ctx, hd, kvd).t(),
                1.0,
            );
            for (i, (row, pr)) in ds.chunks_mut(ctx).zip(p.chunks(ctx)).enumerate() {
                let (first, last) = s.visible(i);
                let c: f32 = (first..=last).map(|j| pr[j] * row[j]).sum();
                for j in first..=last {
                    row[j] = pr[j] * (row[j] - c);
                }
                row[..first].fill(0.0);
                row[last + 1..].fill(0.0);
            }
            let mut dq = vec![0f32; len * hd];
            gemm(
                &mut dq,
                hd,
                false,
                Mat::new(&ds, len, ctx),
                Mat::strided(&k[kh * hd..], ctx, hd, kvd),
                s.scale,
            );
            let mut dk = vec![0f32; ctx * hd];
            gemm(
                &mut dk,
                hd,
                false,
                Mat::new(&ds, len, ctx).t(),
                Mat::strided(&q[h * hd..], len, hd, qd),
                s.scale,
            );
            (dq, dk, dv)
        })
        .collect();
    let mut g = Grads {
        dq: vec![0f32; len * qd],
        dk: vec![0f32; ctx * kvd],
        dv: vec![0f32; ctx * kvd],
    };
    for (h, (dq, dk, dv)) in per_head.into_iter().enumerate() {
        let kh = s.kv_head(h);
        for (i, row) in dq.chunks(hd).enumerate() {
            g.dq[i * qd + h * hd..][..hd].copy_from_slice(row);
        }
        for (j, (rk, rv)) in dk.chunks(hd).zip(dv.chunks(hd)).enumerate() {
            let at = j * kvd + kh * hd;
            g.dk[at..at + hd]
                .iter_mut()
                .zip(rk)
                .for_each(|(a, b)| *a += b);
            g.dv[at..at + hd]
                .iter_mut()
                .zip(rv)
                .for_each(|(a, b)| *a += b);
        }
    }
    g
}
