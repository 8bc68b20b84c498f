//! The top of a training chunk on the CPU in f32: final norm, LM head and cross-entropy with
//! its gradient in closed form (fused linear cross-entropy), for the rows that have a label
//! only, in blocks of rows so that at most a block's [rows, vocab] logits are ever held —
//! and those are turned into their gradient in place. `head.rs`'s candle version is the
//! reference (`crates/tandem-model/tests/finetune.rs`).

use super::host::{to_vec, HostF32};
use super::rows;
use crate::error::{ModelError, Result};
use crate::finetune::HeadOut;
use crate::llama::Llama;
use candle_core::Tensor;
use rayon::prelude::*;
use tandem_kernels::matmul::{gemm, xwt, Mat};
use tandem_kernels::vexp::exp_in_place;

/// Logit bytes a block of rows may hold (the vocabulary's logits of each row).
const BLOCK_BYTES: usize = 64 << 20;

/// One row of logits turned into exp(z − max) in place: returns (log-sum-exp, the first index
/// of the largest logit, the logit of `label`, Σ exp(z − max)).
fn softmax_row(z: &mut [f32], label: usize) -> (f32, usize, f32, f32) {
    let (mut best, mut at) = (f32::NEG_INFINITY, 0);
    for (j, &v) in z.iter().enumerate() {
        if v > best {
            best = v;
            at = j;
        }
    }
    let picked = z[label];
    z.iter_mut().for_each(|v| *v -= best);
    exp_in_place(z);
    let sum: f32 = z.iter().sum();
    (sum.ln() + best, at, picked, sum)
}

/// One caller's rows of a head pass: its labels (one per row, in order) and the weight of its
/// loss (None: the loss only, no gradient).
pub(crate) struct Part<'a> {
    pub labels: &'a [Option<u32>],
    pub weight: Option<f64>,
}

/// `Llama::head` for several callers' rows at once: `x` [Σ rows, hidden] the top layer's output,
/// part after part. The LM head's weight is read twice for all of them (logits, then the input
/// gradient), not twice per part.
pub(crate) fn head_parts(model: &Llama, x: &Tensor, parts: &[Part]) -> Result<Vec<HeadOut>> {
    let h = model.cfg.hidden_size;
    let vocab = model.cfg.vocab_size;
    let xs = to_vec(x)?;
    let len: usize = parts.iter().map(|p| p.labels.len()).sum();
    if xs.len() != len * h {
        return Err(ModelError::Batch(format!(
            "a head pass over {} values for {len} rows of {h}",
            xs.len()
        )));
    }
    // Target rows: (row, label, weight, part).
    let mut rows: Vec<(usize, usize, Option<f32>, usize)> = Vec::new();
    let mut at = 0;
    for (k, p) in parts.iter().enumerate() {
        for (i, l) in p.labels.iter().enumerate() {
            if let Some(t) = l {
                if *t as usize >= vocab {
                    return Err(ModelError::Batch(format!(
                        "label {t} is outside the vocabulary of {vocab}"
                    )));
                }
                rows.push((at + i, *t as usize, p.weight.map(|w| w as f32), k));
            }
        }
        at += p.labels.len();
    }
    let mut outs: Vec<HeadOut> = parts
        .iter()
        .map(|p| {
            let d_x = match p.weight {
                Some(_) => Tensor::zeros((p.labels.len(), h), x.dtype(), x.device()),
                None => Tensor::zeros(0, x.dtype(), x.device()),
            };
            Ok(HeadOut {
                loss_sum: 0.0,
                targets: 0,
                correct: 0,
                logps: Vec::new(),
                d_x: d_x?,
            })
        })
        .collect::<Result<_>>()?;
    if rows.is_empty() {
        return Ok(outs);
    }
    let mut sel = Vec::with_capacity(rows.len() * h);
    for &(i, ..) in &rows {
        sel.extend_from_slice(&xs[i * h..(i + 1) * h]);
    }
    let norm = to_vec(&model.norm)?;
    let (hn, rms) = rows::rms_norm(&sel, &norm, model.cfg.rms_norm_eps as f32);
    let lm = HostF32::new(&model.lm_head)?;
    let lm = lm.get();
    let grad = rows.iter().any(|r| r.2.is_some());
    let block = (BLOCK_BYTES / (4 * vocab.max(1))).max(1);
    let mut d_sel = vec![0f32; if grad { rows.len() * h } else { 0 }];
    for b0 in (0..rows.len()).step_by(block) {
        let n = block.min(rows.len() - b0);
        let mut z = xwt(&hn[b0 * h..(b0 + n) * h], lm, n, vocab, h);
        let stats: Vec<(f32, usize, f32, f32)> = z
            .par_chunks_mut(vocab)
            .enumerate()
            .map(|(r, row)| softmax_row(row, rows[b0 + r].1))
            .collect();
        for (r, &(lse, arg, picked, _)) in stats.iter().enumerate() {
            let (_, t, _, k) = rows[b0 + r];
            let nll = lse - picked;
            let o = &mut outs[k];
            o.loss_sum += nll as f64;
            o.logps.push(-nll);
            o.targets += 1;
            o.correct += usize::from(arg == t);
        }
        if !grad {
            continue;
        }
        // d loss / dz = w · (softmax(z) − onehot(label)), in place: each row holds
        // exp(z − max), and softmax = that / e^(lse − max).
        z.par_chunks_mut(vocab)
            .zip(stats.par_iter())
            .enumerate()
            .for_each(|(r, (row, &(_, _, _, sum)))| {
                let (_, t, w, _) = rows[b0 + r];
                let w = w.unwrap_or(0.0);
                let scale = w / sum;
                for v in row.iter_mut() {
                    *v *= scale;
                }
                row[t] -= w;
            });
        gemm(
            &mut d_sel[b0 * h..(b0 + n) * h],
            h,
            false,
            Mat::new(&z, n, vocab),
            Mat::new(lm, vocab, h),
            1.0,
        );
    }
    if grad {
        let mut d_rows = vec![0f32; rows.len() * h];
        rows::rms_norm_backward(&mut d_rows, &d_sel, &sel, &rms, &norm);
        let mut d_x: Vec<Vec<f32>> = parts
            .iter()
            .map(|p| {
                vec![
                    0f32;
                    if p.weight.is_some() {
                        p.labels.len() * h
                    } else {
                        0
                    }
                ]
            })
            .collect();
        let starts: Vec<usize> = parts
            .iter()
            .scan(0, |at, p| {
                let s = *at;
                *at += p.labels.len();
                Some(s)
            })
            .collect();
        for (q, &(i, _, w, k)) in rows.iter().enumerate() {
            if w.is_some() {
                let r = i - starts[k];
                d_x[k][r * h..(r + 1) * h].copy_from_slice(&d_rows[q * h..(q + 1) * h]);
            }
        }
        for ((o, d), p) in outs.iter_mut().zip(d_x).zip(parts) {
            if p.weight.is_some() {
                o.d_x =
                    Tensor::from_vec(d, (p.labels.len(), h), x.device())?.to_dtype(x.dtype())?;
            }
        }
    }
    Ok(outs)
}
