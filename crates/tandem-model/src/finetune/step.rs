//! The pieces of token-level backpropagation, each small enough to share an iteration with
//! inference (DESIGN.md, "Token-level finetuning"):
//! - `layer_chunk`: one decoder layer's forward for a chunk of a sequence's tokens, given the
//!   K/V of the tokens before it, in plain (differentiable) candle ops;
//! - `layer_backward`: one (layer, chunk) step: recompute `layer_chunk` from the saved input,
//!   back-propagate the gradient of its output plus the dK/dV that later chunks left for this
//!   chunk's keys and values; out come the gradient for the layer below, the dK/dV for earlier
//!   tokens, and the layer's LoRA gradients. The graph lives only for the step;
//! - `layer_backward_packed`: the same step for several whole short sequences at once (their
//!   rows packed into one chunk, attention kept within each), so that short examples share one
//!   step's projections instead of paying a step each.
//!
//! The top, cross-entropy and its gradient, is `head.rs`.

use super::fused::{self, host_vec};
use crate::error::Result;
use crate::llama::Llama;
use crate::lora::Proj;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Storage, Tensor, Var, D};
use std::collections::HashMap;

/// `x · Wᵀ` with a frozen weight W [out, in] (base projections, the LM head). In a backward it
/// forms only the input's gradient `dy · W`: candle's matmul backward would also form the
/// weight's, a weight-sized product (and a weight-sized zero buffer) per step that LoRA training
/// throws away. The forward is the product the inference forward runs (`tandem_kernels::dense`:
/// batch-invariant on the CPU in f32, candle's matmul otherwise), so results are equal.
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
        let y = tandem_kernels::dense(&x, &self.0)?;
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
pub(super) fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
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

/// One sequence's rows in a (layer, chunk) step: `len` rows at positions `start..start + len`
/// of that sequence, attending to `k_prev` / `v_prev` [start, kv heads, head dim], the keys
/// (after RoPE) and values of its positions before `start`. Several segments in one step are
/// short sequences packed together: the projections run once over all their rows, attention
/// stays within each segment.
#[derive(Clone, Copy)]
pub struct Segment<'a> {
    pub len: usize,
    pub start: usize,
    pub k_prev: Option<&'a Tensor>,
    pub v_prev: Option<&'a Tensor>,
}

impl Segment<'_> {
    /// A whole sequence of `len` tokens from position 0.
    pub fn whole(len: usize) -> Self {
        Self {
            len,
            start: 0,
            k_prev: None,
            v_prev: None,
        }
    }
}

impl Llama {
    /// Whether training's layer steps take the hand-written CPU path (`finetune::fused`).
    pub(crate) fn fused_layers(&self) -> bool {
        !self.autograd_layers && fused::supported(self)
    }

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
        let seg = Segment {
            len: x.dim(0)?,
            start,
            k_prev,
            v_prev,
        };
        self.layer_segments(l, x, &[seg], lora)
    }

    /// Decoder layer `l` on the rows of `x` [Σ len, hidden], segment after segment. Returns the
    /// output [Σ len, hidden] and the segments' own keys and values [Σ len, kv heads, head dim].
    pub fn layer_segments(
        &self,
        l: usize,
        x: &Tensor,
        segs: &[Segment],
        lora: &LayerLora,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let layer = &self.layers[l];
        let (t, _) = x.dims2()?;
        if segs.iter().map(|s| s.len).sum::<usize>() != t || segs.is_empty() {
            return Err(crate::error::ModelError::Batch(format!(
                "segments of {:?} rows over a chunk of {t}",
                segs.iter().map(|s| s.len).collect::<Vec<_>>()
            )));
        }
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
        let rows = |table: &Tensor| -> Result<Tensor> {
            let parts = segs
                .iter()
                .map(|s| table.narrow(0, s.start, s.len))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(match parts.len() {
                1 => parts.into_iter().next().expect("one segment"),
                _ => Tensor::cat(&parts, 0)?,
            })
        };
        let (cos, sin) = (rows(&self.cos)?, rows(&self.sin)?);
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
        let mut outs = Vec::with_capacity(segs.len());
        let mut off = 0;
        for s in segs {
            let narrow = |a: &Tensor| a.narrow(0, off, s.len);
            outs.push(self.attend(&narrow(&q)?, &narrow(&k)?, &narrow(&v)?, s)?);
            off += s.len;
        }
        let o = match outs.len() {
            1 => outs.pop().expect("one segment"),
            _ => Tensor::cat(&outs, 0)?,
        }
        .to_dtype(x.dtype())?;
        let x = (x + lin(Proj::O, &layer.o, &o)?)?;
        let h = candle_nn::ops::rms_norm_slow(&x, &layer.post_norm, eps)?;
        let mlp = (candle_nn::ops::silu(&lin(Proj::Gate, &layer.gate, &h)?)?
            * lin(Proj::Up, &layer.up, &h)?)?;
        let out = (&x + lin(Proj::Down, &layer.down, &mlp)?)?;
        Ok((out, k, v))
    }

    /// Causal attention of one segment: q, k, v [len, heads, head dim] (after RoPE) at
    /// positions `s.start..`, over its earlier keys and values and its own. Returns
    /// [len, heads · head dim] in f32.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, s: &Segment) -> Result<Tensor> {
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let (t, start) = (s.len, s.start);
        let (k_all, v_all) = match (s.k_prev, s.v_prev) {
            (Some(kp), Some(vp)) if kp.dim(0)? > 0 => {
                (Tensor::cat(&[kp, k], 0)?, Tensor::cat(&[vp, v], 0)?)
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
        let mask = Tensor::from_vec(mask, (1, t, ctx), q.device())?;
        let qs = q.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (qs.matmul(&expand(&k_all)?.t()?)? * scale)?.broadcast_add(&mask)?;
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        Ok(att
            .matmul(&expand(&v_all)?)?
            .transpose(0, 1)?
            .reshape((t, nh * hd))?)
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
        if self.fused_layers() {
            let seg = Segment {
                len: x.dim(0)?,
                start,
                k_prev,
                v_prev,
            };
            let (_, acts) = fused::layer_forward(self, l, host_vec(x)?, &[seg], lora)?;
            let (dk, dv) = (host_vec(d_k)?, host_vec(d_v)?);
            return fused::layer_backward(self, acts, host_vec(d_out)?, Some((&dk, &dv)), lora);
        }
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
        let objective = ((dot(&out, d_out)? + dot(&k, d_k)?)? + dot(&v, d_v)?)?;
        let grads = objective.backward()?;
        let grad = |v: &Tensor| grad_of(&grads, v);
        Ok(ChunkGrads {
            d_x: grad(xv.as_tensor())?.to_dtype(x.dtype())?,
            d_k_prev: kp.map(|k| grad(k.as_tensor())).transpose()?,
            d_v_prev: vp.map(|v| grad(v.as_tensor())).transpose()?,
            lora: lora_grads(&grads, lora)?,
        })
    }

    /// One layer's backward step for whole short sequences packed into one chunk: `x`
    /// [Σ lens, hidden] their saved inputs to layer `l` one after the other, `d_out` the
    /// gradients of their outputs. Each sequence is a single chunk from position 0, so no
    /// other chunk's keys or values enter: the step is the sum of the sequences' own steps.
    pub fn layer_backward_packed(
        &self,
        l: usize,
        x: &Tensor,
        lens: &[usize],
        d_out: &Tensor,
        lora: &LayerLora,
    ) -> Result<ChunkGrads> {
        let segs: Vec<Segment> = lens.iter().map(|&n| Segment::whole(n)).collect();
        if self.fused_layers() {
            let (_, acts) = fused::layer_forward(self, l, host_vec(x)?, &segs, lora)?;
            return fused::layer_backward(self, acts, host_vec(d_out)?, None, lora);
        }
        let xv = Var::from_tensor(x)?;
        let (out, _, _) = self.layer_segments(l, xv.as_tensor(), &segs, lora)?;
        KeptLayer::Graph(xv, out).backward(self, d_out, lora)
    }
}

/// A layer's forward kept for its backward (`Unit::forward_kept`): candle's autograd graph (the
/// layer's input as a variable, and its output), or the hand-written CPU layer's activations.
pub enum KeptLayer {
    Graph(Var, Tensor),
    Fused(Box<fused::LayerActs>),
}

impl KeptLayer {
    /// Bytes held (None for a graph: candle does not say).
    pub fn bytes(&self) -> Option<usize> {
        match self {
            KeptLayer::Graph(..) => None,
            KeptLayer::Fused(a) => Some(a.bytes()),
        }
    }

    /// The backward of the kept layer (over whole sequences): the gradients
    /// `layer_backward_packed` gives, without recomputing the forward.
    pub fn backward(self, model: &Llama, d_out: &Tensor, lora: &LayerLora) -> Result<ChunkGrads> {
        match self {
            KeptLayer::Graph(x, out) => {
                let grads = dot(&out, d_out)?.backward()?;
                Ok(ChunkGrads {
                    d_x: grad_of(&grads, x.as_tensor())?.to_dtype(x.dtype())?,
                    d_k_prev: None,
                    d_v_prev: None,
                    lora: lora_grads(&grads, lora)?,
                })
            }
            KeptLayer::Fused(acts) => {
                fused::layer_backward(model, *acts, host_vec(d_out)?, None, lora)
            }
        }
    }
}

/// Σ a·b in f32.
fn dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a.to_dtype(DType::F32)? * b.to_dtype(DType::F32)?)?.sum_all()?)
}

/// The gradient of `v` (zeros if it did not enter the objective).
fn grad_of(grads: &candle_core::backprop::GradStore, v: &Tensor) -> Result<Tensor> {
    Ok(match grads.get(v) {
        Some(g) => g.clone(),
        None => v.zeros_like()?,
    })
}

/// Per trained projection of the layer: (dA, dB).
fn lora_grads(
    grads: &candle_core::backprop::GradStore,
    lora: &LayerLora,
) -> Result<HashMap<Proj, (Tensor, Tensor)>> {
    let mut out = HashMap::new();
    for (p, (a, b, _)) in &lora.modules {
        out.insert(
            *p,
            (
                grad_of(grads, a.as_tensor())?,
                grad_of(grads, b.as_tensor())?,
            ),
        );
    }
    Ok(out)
}
