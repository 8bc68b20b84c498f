//! The element-wise parts of a decoder layer, forward and backward, row by row on host f32
//! buffers: RMSNorm, RoPE (HF's rotate-half form) and the SwiGLU product. Large buffers are
//! split over rayon's threads by rows.

use rayon::prelude::*;
use tandem_kernels::vexp::exp_in_place;

/// Runs `f` compiled for AVX-512 where the CPU has it: the element-wise loops inlined into it
/// vectorise 16 lanes wide instead of the SSE2 baseline's 4, with the same arithmetic (Rust
/// fuses no multiply-add by itself, so results are the same bits).
#[inline(always)]
pub(super) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f")]
        unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU has AVX-512F.
        return unsafe { run(f) };
    }
    f()
}

/// Elements below which a row-wise pass stays on the calling thread.
const SERIAL: usize = 1 << 15;

/// Runs `f(row index, row)` over the rows of `width` values of `buf`, on several threads when
/// the buffer is large.
pub(super) fn for_rows(buf: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if width == 0 {
        return;
    }
    if buf.len() <= SERIAL {
        buf.chunks_mut(width).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        buf.par_chunks_mut(width)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    }
}

/// RMSNorm of the rows of `x` [rows, w.len()]: `x / sqrt(mean(x²) + eps) · w` (candle's
/// `rms_norm_slow`). Returns the normed rows and each row's `sqrt(mean(x²) + eps)`.
pub(super) fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    let rms_of = |r: &[f32]| {
        let ss: f32 = r.iter().map(|v| v * v).sum();
        (ss / h as f32 + eps).sqrt()
    };
    let rms: Vec<f32> = if x.len() <= SERIAL {
        x.chunks(h.max(1)).map(rms_of).collect()
    } else {
        x.par_chunks(h.max(1)).map(rms_of).collect()
    };
    let mut y = copied(x);
    for_rows(&mut y, h, |i, r| {
        let d = rms[i];
        wide(|| {
            for (v, g) in r.iter_mut().zip(w) {
                *v = *v / d * g;
            }
        })
    });
    (y, rms)
}

/// `x` as a new vector, copied on several threads when large (no serial pass while the other
/// threads wait).
fn copied(x: &[f32]) -> Vec<f32> {
    if x.len() <= SERIAL {
        return x.to_vec();
    }
    let mut y = Vec::with_capacity(x.len());
    y.par_extend(x.par_iter().copied());
    y
}

/// `a += b` element by element, on several threads when large.
pub(super) fn add_into(a: &mut [f32], b: &[f32]) {
    let add = |a: &mut [f32], b: &[f32]| wide(|| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
    if a.len() <= SERIAL {
        add(a, b);
    } else {
        a.par_chunks_mut(4096)
            .zip(b.par_chunks(4096))
            .for_each(|(a, b)| add(a, b));
    }
}

/// Adds the gradient w.r.t. `x` of RMSNorm's output to `dx`, given `dy` (the gradient of the
/// normed rows), `x` and the rows' `rms` from `rms_norm`: with n = x / rms,
/// dx = (dy·w − n · mean(dy·w · n)) / rms.
pub(super) fn rms_norm_backward(dx: &mut [f32], dy: &[f32], x: &[f32], rms: &[f32], w: &[f32]) {
    let h = w.len();
    for_rows(dx, h, |i, out| {
        let (dy, x) = (&dy[i * h..][..h], &x[i * h..][..h]);
        let r = rms[i];
        let mut dot = 0f32;
        for ((d, v), g) in dy.iter().zip(x).zip(w) {
            dot += d * g * (v / r);
        }
        let mean = dot / h as f32;
        wide(|| {
            for (((o, d), v), g) in out.iter_mut().zip(dy).zip(x).zip(w) {
                *o += (d * g - (v / r) * mean) / r;
            }
        })
    });
}

/// RoPE on rows of `heads` heads of `hd` values in place, row i at position `pos[i]`, with
/// `cos`/`sin` tables of `hd / 2` values per position. `inverse` applies the transposed
/// rotation (the backward of RoPE).
pub(super) fn rope(
    x: &mut [f32],
    heads: usize,
    hd: usize,
    pos: &[usize],
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) {
    let half = hd / 2;
    for_rows(x, heads * hd, |i, row| {
        let (c, s) = (&cos[pos[i] * half..][..half], &sin[pos[i] * half..][..half]);
        wide(|| {
            for head in row.chunks_mut(hd) {
                let (x1, x2) = head.split_at_mut(half);
                let (x1, x2) = (&mut x1[..half], &mut x2[..half]);
                if inverse {
                    for j in 0..half {
                        let (a, b) = (x1[j], x2[j]);
                        x1[j] = a * c[j] + b * s[j];
                        x2[j] = b * c[j] - a * s[j];
                    }
                } else {
                    for j in 0..half {
                        let (a, b) = (x1[j], x2[j]);
                        x1[j] = a * c[j] - b * s[j];
                        x2[j] = b * c[j] + a * s[j];
                    }
                }
            }
        })
    });
}

/// SwiGLU: `silu(g) · u` element by element, and σ(g) (what the backward needs).
pub(super) fn swiglu(g: &[f32], u: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = g.len();
    let w = 4096.min(n).max(1);
    // σ(g) = 1 / (1 + exp(−g)), then silu(g)·u = u · (g · σ(g)); each output written once, on
    // several threads when large.
    let sigmoid = |sr: &mut [f32]| {
        exp_in_place(sr);
        wide(|| sr.iter_mut().for_each(|s| *s = 1.0 / (1.0 + *s)));
    };
    let product = |((u, g), s): ((&f32, &f32), &f32)| u * (g * s);
    if n <= SERIAL {
        let mut sig: Vec<f32> = g.iter().map(|v| -v).collect();
        sig.chunks_mut(w).for_each(sigmoid);
        let m = u.iter().zip(g).zip(&sig).map(product).collect();
        return (m, sig);
    }
    let mut sig = Vec::with_capacity(n);
    sig.par_extend(g.par_iter().map(|v| -v));
    sig.par_chunks_mut(w).for_each(sigmoid);
    let mut m = Vec::with_capacity(n);
    m.par_extend(u.par_iter().zip(g).zip(&sig).map(product));
    (m, sig)
}

/// SwiGLU's backward: from `dm` (gradient of silu(g)·u) the gradients of `g` (written into
/// `dm`'s place) and of `u` (returned); `sig` is σ(g) from the forward.
pub(super) fn swiglu_backward(dm: &mut [f32], g: &[f32], u: &[f32], sig: &[f32]) -> Vec<f32> {
    let mut du = vec![0f32; dm.len()];
    let w = 4096.min(dm.len()).max(1);
    let work = |i: usize, (d, du): (&mut [f32], &mut [f32])| {
        let n = d.len();
        let (g, u, sig, du) = (
            &g[i * w..][..n],
            &u[i * w..][..n],
            &sig[i * w..][..n],
            &mut du[..n],
        );
        wide(|| {
            for j in 0..n {
                let silu = g[j] * sig[j];
                du[j] = d[j] * silu;
                d[j] *= u[j] * sig[j] * (1.0 + g[j] * (1.0 - sig[j]));
            }
        })
    };
    if dm.len() <= SERIAL {
        dm.chunks_mut(w)
            .zip(du.chunks_mut(w))
            .enumerate()
            .for_each(|(i, p)| work(i, p));
    } else {
        dm.par_chunks_mut(w)
            .zip(du.par_chunks_mut(w))
            .enumerate()
            .for_each(|(i, p)| work(i, p));
    }
    du
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(f: impl Fn(&[f64]) -> f64, x: &[f64]) -> Vec<f64> {
        (0..x.len())
            .map(|i| {
                let (mut a, mut b) = (x.to_vec(), x.to_vec());
                a[i] += 1e-6;
                b[i] -= 1e-6;
                (f(&a) - f(&b)) / 2e-6
            })
            .collect()
    }

    #[test]
    fn rms_norm_backward_is_the_derivative() {
        let x: Vec<f32> = (0..12).map(|i| (i as f32 * 0.7).sin()).collect();
        let w: Vec<f32> = (0..6).map(|i| 0.5 + i as f32 * 0.1).collect();
        let dy: Vec<f32> = (0..12).map(|i| (i as f32 * 1.3).cos()).collect();
        let (_, rms) = rms_norm(&x, &w, 1e-5);
        let mut dx = vec![0f32; 12];
        rms_norm_backward(&mut dx, &dy, &x, &rms, &w);
        let f = |xs: &[f64]| -> f64 {
            xs.chunks(6)
                .enumerate()
                .map(|(r, row)| {
                    let d = (row.iter().map(|v| v * v).sum::<f64>() / 6.0 + 1e-5).sqrt();
                    row.iter()
                        .enumerate()
                        .map(|(j, v)| v / d * w[j] as f64 * dy[r * 6 + j] as f64)
                        .sum::<f64>()
                })
                .sum()
        };
        let want = numeric(f, &x.iter().map(|&v| v as f64).collect::<Vec<_>>());
        for (g, w) in dx.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-4, "{g} vs {w}");
        }
    }

    #[test]
    fn rope_inverse_undoes_rope_and_swiglu_backward_is_the_derivative() {
        let (heads, hd) = (2, 4);
        let cos = [1.0, 0.5, 0.8, 0.6, 0.0, 1.0];
        let sin = [0.0, 0.866, 0.6, 0.8, 1.0, 0.0];
        let x: Vec<f32> = (0..16).map(|i| i as f32 - 7.5).collect();
        let mut y = x.clone();
        rope(&mut y, heads, hd, &[1, 2], &cos, &sin, false);
        assert_ne!(y, x);
        rope(&mut y, heads, hd, &[1, 2], &cos, &sin, true);
        for (a, b) in y.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5);
        }
        let g: Vec<f32> = (0..5).map(|i| i as f32 * 0.6 - 1.2).collect();
        let u: Vec<f32> = (0..5).map(|i| 1.0 - i as f32 * 0.3).collect();
        let mut dm: Vec<f32> = vec![1.0, -0.5, 0.25, 2.0, 0.1];
        let dm0 = dm.clone();
        let (m, sig) = swiglu(&g, &u);
        let du = swiglu_backward(&mut dm, &g, &u, &sig);
        let silu = |v: f64| v / (1.0 + (-v).exp());
        for j in 0..5 {
            let (gv, uv) = (g[j] as f64, u[j] as f64);
            let dg = (silu(gv + 1e-6) - silu(gv - 1e-6)) / 2e-6 * uv * dm0[j] as f64;
            assert!((dm[j] as f64 - dg).abs() < 1e-4);
            assert!((du[j] as f64 - silu(gv) * dm0[j] as f64).abs() < 1e-5);
        }
        assert!((m[4] as f64 - silu(g[4] as f64) * u[4] as f64).abs() < 1e-6);
    }
}
