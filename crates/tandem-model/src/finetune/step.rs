//! The pieces of token-level backpropagation, each small enough to share an iteration with
//! inference (DESIGN.md, "Token-level finetuning"):
//! - `layer_chunk`: one decoder layer's forward for a chunk of a sequence's tokens, given the
//!   K/V of the tokens before it, in plain (differentiable) candle ops;
//! - `layer_backward`: one (layer, chunk) step: recompute `layer_chunk` from the saved input,
//!   back-propagate the gradient of its output plus the dK/dV that later chunks left for this
//!   chunk's keys and values; out come the gradient for the layer below, the dK/dV for earlier
//!   tokens, and the layer's LoRA gradients. The graph lives only for the step;
//! - `head_backward`: cross-entropy at the top for a chunk and its gradient.

use crate::error::Result;
use crate::llama::Llama;
use crate::lora::Proj;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Storage, Tensor, Var, D};
use std::collections::HashMap;

/// `x · Wᵀ` with a frozen weight W [out, in] (base projections, the LM head). In a backward it
/// forms only the input's gradient `dy · W`: candle's matmul backward would also form the
/// weight's, a weight-sized product (and a weight-sized zero buffer) per step that LoRA training
/// throws away. The forward is the same matmul `candle_nn::Linear` runs, so results are equal.
struct FrozenLinear(Tensor);

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("frozen-linear: the input must be contiguous")
        };
        let dev = candle_core::Device::Cpu;
        let x = match s {
            CpuStorage::F32(v) => Tensor::from_slice(&v[a..b], l.shape(), &dev)?,
            CpuStorage::F64(v) => Tensor::from_slice(&v[a..b], l.shape(), &dev)?,
            CpuStorage::BF16(v) => Tensor::from_slice(&v[a..b], l.shape(), &dev)?,
            CpuStorage::F16(v) => Tensor::from_slice(&v[a..b], l.shape(), &dev)?,
            _ => candle_core::bail!("frozen-linear: unsupported dtype"),
        };
        let y = x.matmul(&self.0.t()?)?;
        let (st, yl) = y.storage_and_layout();
        match &*st {
            Storage::Cpu(c) if yl.is_contiguous() && yl.start_offset() == 0 => {
                Ok((c.clone(), y.shape().clone()))
            }
            _ => candle_core::bail!("frozen-linear: unexpected result layout"),
        }
    }

    /// The same product on the GPU: cuBLAS through the storage's matmul, W read transposed in
    /// place.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (m, k) = l.shape().dims2()?;
        let (n, wk) = self.0.dims2()?;
        if wk != k {
            candle_core::bail!("frozen-linear: input [{m}, {k}] against a weight [{n}, {wk}]")
        }
        let (ws, wl) = self.0.storage_and_layout();
        let Storage::Cuda(w) = &*ws else {
            candle_core::bail!("frozen-linear: the weight is not on the GPU")
        };
        let out = s.matmul(w, (1, m, n, k), l, &wl.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(dy.matmul(&self.0)?))
    }
}

/// `x · Wᵀ` for a frozen weight through `FrozenLinear` (CPU, and CUDA builds); elsewhere, or
/// if the op cannot take these operands, candle's matmul (same values, plus a weight gradient
/// that is thrown away).
fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let on_op = x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda());
    if on_op {
        match x.contiguous()?.apply_op1(FrozenLinear(w.clone())) {
            Ok(y) => return Ok(y),
            Err(e) if !x.device().is_cpu() => {
                tracing::debug!(error = %e, "frozen-linear: falling back to matmul");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(x.matmul(&w.t()?)?)
}

/// A layer's trainable LoRA weights: per targeted projection, A [r, in], B [out, r] (f32 master
/// weights) and the scale.
#[derive(Default, Clone)]
pub struct LayerLora {
    pub modules: HashMap<Proj, (Var, Var, f64)>,
}

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

/// What one (layer, chunk) step gives.
pub struct ChunkGrads {
    /// Gradient of the objective w.r.t. the chunk's input to this layer [len, hidden].
    pub d_x: Tensor,
    /// Gradients w.r.t. the keys and values of the tokens before the chunk [start, kv heads, head dim].
    pub d_k_prev: Option<Tensor>,
    pub d_v_prev: Option<Tensor>,
    /// Per projection: (dA, dB).
    pub lora: HashMap<Proj, (Tensor, Tensor)>,
}

/// RoPE in HF's rotate-half form on x [t, heads, head dim] with cos/sin [t, head dim / 2], in
/// differentiable candle ops (candle-nn's fused rope has no backward).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(2)?;
    let x1 = x.narrow(2, 0, d / 2)?;
    let x2 = x.narrow(2, d / 2, d / 2)?;
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Ok(Tensor::cat(&[r1, r2], 2)?)
}

impl Llama {
    /// Decoder layer `l` on a chunk: `x` [len, hidden] at positions `start..start + len`, with
    /// `k_prev` / `v_prev` [start, kv heads, head dim] the keys (after RoPE) and values of the
    /// positions before it. Returns the layer's output [len, hidden] and the chunk's own keys and
    /// values [len, kv heads, head dim].
    pub fn layer_chunk(
        &self,
        l: usize,
        x: &Tensor,
        start: usize,
        k_prev: Option<&Tensor>,
        v_prev: Option<&Tensor>,
        lora: &LayerLora,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let layer = &self.layers[l];
        let (t, _) = x.dims2()?;
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let eps = self.cfg.rms_norm_eps as f32;
        let lin = |p: Proj, linear: &candle_nn::Linear, h: &Tensor| -> Result<Tensor> {
            let y = match linear.bias() {
                None if h.rank() == 2 => frozen_linear(h, linear.weight())?,
                _ => linear.forward(h)?,
            };
            match lora.modules.get(&p) {
                Some((a, b, s)) => {
                    let a = a.as_tensor().to_dtype(h.dtype())?;
                    let b = b.as_tensor().to_dtype(h.dtype())?;
                    Ok((y + (h.matmul(&a.t()?)?.matmul(&b.t()?)? * *s)?)?)
                }
                None => Ok(y),
            }
        };
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        let h = candle_nn::ops::rms_norm_slow(x, &layer.input_norm, eps)?;
        let q = rope(
            &lin(Proj::Q, &layer.q, &h)?.reshape((t, nh, hd))?,
            &cos,
            &sin,
        )?;
        let k = rope(
            &lin(Proj::K, &layer.k, &h)?.reshape((t, nkv, hd))?,
            &cos,
            &sin,
        )?;
        let v = lin(Proj::V, &layer.v, &h)?.reshape((t, nkv, hd))?;
        let (k_all, v_all) = match (k_prev, v_prev) {
            (Some(kp), Some(vp)) if kp.dim(0)? > 0 => {
                (Tensor::cat(&[kp, &k], 0)?, Tensor::cat(&[vp, &v], 0)?)
            }
            _ => (k.clone(), v.clone()),
        };
        let ctx = start + t;
        let group = nh / nkv;
        let expand = |c: &Tensor| -> Result<Tensor> {
            Ok(c.to_dtype(DType::F32)?
                .transpose(0, 1)?
                .unsqueeze(1)?
                .broadcast_as((nkv, group, ctx, hd))?
                .reshape((nh, ctx, hd))?)
        };
        let mut mask = Vec::with_capacity(t * ctx);
        for i in 0..t {
            let pos = start + i;
            let first = self
                .cfg
                .sliding_window
                .map_or(0, |w| (pos + 1).saturating_sub(w));
            mask.extend((0..ctx).map(|j| {
                if j >= first && j <= pos {
                    0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
        let mask = Tensor::from_vec(mask, (1, t, ctx), x.device())?;
        let qs = q.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (qs.matmul(&expand(&k_all)?.t()?)? * scale)?.broadcast_add(&mask)?;
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let o = att
            .matmul(&expand(&v_all)?)?
            .transpose(0, 1)?
            .to_dtype(x.dtype())?
            .reshape((t, nh * hd))?;
        let x = (x + lin(Proj::O, &layer.o, &o)?)?;
        let h = candle_nn::ops::rms_norm_slow(&x, &layer.post_norm, eps)?;
        let mlp = (candle_nn::ops::silu(&lin(Proj::Gate, &layer.gate, &h)?)?
            * lin(Proj::Up, &layer.up, &h)?)?;
        let out = (&x + lin(Proj::Down, &layer.down, &mlp)?)?;
        Ok((out, k, v))
    }

    /// One (layer, chunk) step of the backward. `x` is the chunk's saved input to layer `l`,
    /// `d_out` the gradient of the loss w.r.t. the layer's output for the chunk, `d_k` / `d_v`
    /// [len, kv heads, head dim] what later chunks contributed to the gradient of this chunk's
    /// keys and values.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_backward(
        &self,
        l: usize,
        x: &Tensor,
        start: usize,
        k_prev: Option<&Tensor>,
        v_prev: Option<&Tensor>,
        d_out: &Tensor,
        d_k: &Tensor,
        d_v: &Tensor,
        lora: &LayerLora,
    ) -> Result<ChunkGrads> {
        let xv = Var::from_tensor(x)?;
        let kp = k_prev.map(Var::from_tensor).transpose()?;
        let vp = v_prev.map(Var::from_tensor).transpose()?;
        let (out, k, v) = self.layer_chunk(
            l,
            xv.as_tensor(),
            start,
            kp.as_ref().map(|v| v.as_tensor()),
            vp.as_ref().map(|v| v.as_tensor()),
            lora,
        )?;
        let dot = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
            Ok((a.to_dtype(DType::F32)? * b.to_dtype(DType::F32)?)?.sum_all()?)
        };
        let objective = ((dot(&out, d_out)? + dot(&k, d_k)?)? + dot(&v, d_v)?)?;
        let grads = objective.backward()?;
        let grad = |v: &Tensor| -> Result<Tensor> {
            Ok(match grads.get(v) {
                Some(g) => g.clone(),
                None => v.zeros_like()?,
            })
        };
        let mut lora_grads = HashMap::new();
        for (p, (a, b, _)) in &lora.modules {
            lora_grads.insert(*p, (grad(a.as_tensor())?, grad(b.as_tensor())?));
        }
        Ok(ChunkGrads {
            d_x: grad(xv.as_tensor())?.to_dtype(x.dtype())?,
            d_k_prev: kp.map(|k| grad(k.as_tensor())).transpose()?,
            d_v_prev: vp.map(|v| grad(v.as_tensor())).transpose()?,
            lora: lora_grads,
        })
    }

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

    /// `head_backward`'s loss without the gradient (`d_x` is empty): what a forward-only
    /// pass (an evaluation, a DPO reference) needs, with the same arithmetic.
    pub fn head_loss(&self, x: &Tensor, labels: &[Option<u32>]) -> Result<HeadOut> {
        self.head(x, labels, None)
    }

    fn head(&self, x: &Tensor, labels: &[Option<u32>], weight: Option<f64>) -> Result<HeadOut> {
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
