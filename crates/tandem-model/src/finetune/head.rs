//! The top of a training chunk: the final norm, the LM head and cross-entropy on the rows that
//! have a label only, with its gradient in closed form (`head_backward`), the same loss without
//! the gradient (`head_loss`), and a differentiable version for whole-graph references
//! (`head_nll`).

use super::step::frozen_linear;
use crate::error::Result;
use crate::llama::Llama;
use candle_core::{DType, Tensor, Var, D};

/// What `head_backward` gives for a chunk.
pub struct HeadOut {
    /// Σ -log p(label) over the rows with a label.
    pub loss_sum: f64,
    /// Rows with a label.
    pub targets: usize,
    /// Rows whose argmax is the label.
    pub correct: usize,
    /// log p(label) per row with a label, in row order.
    pub logps: Vec<f32>,
    /// d loss / d x, [len, hidden] (zero on rows without a label).
    pub d_x: Tensor,
}

impl Llama {
    /// Cross-entropy at the top for a chunk: `x` [len, hidden] is the last layer's output,
    /// `labels[i]` the token that row i predicts (None: not a target). The loss is
    /// `weight · Σ -log p(label)`; returns (Σ -log p(label) unweighted, number of targets, and
    /// the gradient of the weighted loss w.r.t. `x`).
    pub fn head_backward(
        &self,
        x: &Tensor,
        labels: &[Option<u32>],
        weight: f64,
    ) -> Result<HeadOut> {
        self.head(x, labels, Some(weight))
    }

    /// `head_backward` for several groups of rows of `x` at once (their rows one after
    /// another, each group with its labels and weight): on the CPU one pass of the LM head for
    /// all of them instead of one per group.
    pub fn head_backward_many(
        &self,
        x: &Tensor,
        parts: &[(&[Option<u32>], f64)],
    ) -> Result<Vec<HeadOut>> {
        if self.fused_layers() {
            let parts: Vec<_> = parts
                .iter()
                .map(|&(labels, w)| super::fused::head::Part {
                    labels,
                    weight: Some(w),
                })
                .collect();
            return super::fused::head::head_parts(self, x, &parts);
        }
        let mut at = 0;
        let mut outs = Vec::with_capacity(parts.len());
        for &(labels, w) in parts {
            outs.push(self.head_backward(&x.narrow(0, at, labels.len())?, labels, w)?);
            at += labels.len();
        }
        Ok(outs)
    }

    /// `head_backward`'s loss without the gradient (`d_x` is empty): what a forward-only
    /// pass (an evaluation, a DPO reference) needs, with the same arithmetic.
    pub fn head_loss(&self, x: &Tensor, labels: &[Option<u32>]) -> Result<HeadOut> {
        self.head(x, labels, None)
    }

    fn head(&self, x: &Tensor, labels: &[Option<u32>], weight: Option<f64>) -> Result<HeadOut> {
        if self.fused_layers() {
            let part = super::fused::head::Part { labels, weight };
            let mut outs = super::fused::head::head_parts(self, x, &[part])?;
            return outs
                .pop()
                .ok_or_else(|| crate::error::ModelError::Batch("no head output".into()));
        }
        let rows: Vec<u32> = (0..labels.len() as u32)
            .filter(|&i| labels[i as usize].is_some())
            .collect();
        if rows.is_empty() {
            return Ok(HeadOut {
                loss_sum: 0.0,
                targets: 0,
                correct: 0,
                logps: Vec::new(),
                d_x: x.zeros_like()?,
            });
        }
        let targets: Vec<u32> = labels.iter().filter_map(|l| *l).collect();
        let dev = x.device();
        let rows_t = Tensor::new(rows.as_slice(), dev)?;
        let targets_t = Tensor::new(targets.as_slice(), dev)?.unsqueeze(1)?;
        let sel = Var::from_tensor(&x.index_select(&rows_t, 0)?)?;
        let h = candle_nn::ops::rms_norm_slow(
            sel.as_tensor(),
            &self.norm,
            self.cfg.rms_norm_eps as f32,
        )?;
        // Cross-entropy and its gradient in closed form, without a graph over the [rows, vocab]
        // logits: loss = logsumexp(z) - z[label], d loss / dz = softmax(z) - onehot(label).
        let z = h
            .detach()
            .matmul(&self.lm_head.t()?)?
            .to_dtype(DType::F32)?;
        let max = z.max_keepdim(D::Minus1)?;
        let lse = (z
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + &max)?;
        let picked = z.gather(&targets_t, 1)?;
        // Token accuracy: rows whose most likely token is the label (ties to the first index,
        // as torch's argmax).
        let correct = z
            .argmax_keepdim(D::Minus1)?
            .eq(&targets_t)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize;
        let nll = (lse - picked)?;
        let logps: Vec<f32> = nll.neg()?.flatten_all()?.to_vec1()?;
        let loss_sum = nll.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        let Some(weight) = weight else {
            return Ok(HeadOut {
                loss_sum,
                targets: rows.len(),
                correct,
                logps,
                d_x: Tensor::zeros(0, x.dtype(), dev)?,
            });
        };
        let minus_one = Tensor::full(-1f32, (rows.len(), 1), dev)?;
        let dz = candle_nn::ops::softmax_last_dim(&z)?.scatter_add(&targets_t, &minus_one, 1)?;
        let dh = (dz * weight)?.to_dtype(h.dtype())?.matmul(&self.lm_head)?;
        // Through the final norm by autograd on the (small) [rows, hidden] part only.
        let grads = (h * dh.detach())?.sum_all()?.backward()?;
        let d_sel = match grads.get(sel.as_tensor()) {
            Some(g) => g.to_dtype(x.dtype())?,
            None => sel.as_tensor().zeros_like()?,
        };
        let d_x = x.zeros_like()?.index_add(&rows_t, &d_sel, 0)?;
        Ok(HeadOut {
            loss_sum,
            targets: rows.len(),
            correct,
            logps,
            d_x,
        })
    }

    /// Σ -log p(label) over the rows of `x` [len, hidden] (last layer's output) that have a
    /// label, as a differentiable f32 scalar, with the number of such rows; None if none has.
    pub fn head_nll(&self, x: &Tensor, labels: &[Option<u32>]) -> Result<Option<(Tensor, usize)>> {
        let rows: Vec<u32> = (0..labels.len() as u32)
            .filter(|&i| labels[i as usize].is_some())
            .collect();
        let targets: Vec<u32> = labels.iter().filter_map(|l| *l).collect();
        if rows.is_empty() {
            return Ok(None);
        }
        let dev = x.device();
        let sel = x.index_select(&Tensor::new(rows.as_slice(), dev)?, 0)?;
        let h = candle_nn::ops::rms_norm_slow(&sel, &self.norm, self.cfg.rms_norm_eps as f32)?;
        let logits = frozen_linear(&h, &self.lm_head)?.to_dtype(DType::F32)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = logp.gather(&Tensor::new(targets.as_slice(), dev)?.unsqueeze(1)?, 1)?;
        Ok(Some((picked.neg()?.sum_all()?, rows.len())))
    }
}
