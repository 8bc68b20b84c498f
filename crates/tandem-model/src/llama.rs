//! The Llama-family forward over a packed batch (Llama 2/3, Mistral, Qwen2, SmolLM).
//!
//! Reference: HF transformers' modeling_llama.py. One forward serves any mix of prefill
//! chunks and decode steps: tokens are concatenated, positions are per token, and attention
//! reads each sequence's keys through its block table in the paged KV cache. The model holds
//! no per-request state.

use crate::attention::attention_gathered;
use crate::batch::PackedBatch;
use crate::config::{rope_inv_freq, ModelConfig};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::lora::{AdapterRegistry, LoraBatch, Proj};
use candle_core::{DType, Device, Tensor};
use candle_nn::Linear;
use std::collections::HashMap;
use std::path::Path;
use tandem_kernels::{
    add_rms_norm, dense, fused_supported, paged_attention, paged_attention_supported, swiglu,
    PagedAttentionMeta,
};

#[derive(Clone)]
pub(crate) struct Layer {
    pub(crate) input_norm: Tensor,
    pub(crate) post_norm: Tensor,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

/// Activations of one segment kept by `forward_packed` for training: the segment's input to
/// every layer, then the last layer's output (num_hidden_layers + 1 tensors of [len, hidden]).
pub struct Captured {
    pub segment: usize,
    pub inputs: Vec<Tensor>,
}

/// Clones share the weights' storage (candle tensors are reference-counted).
#[derive(Clone)]
pub struct Llama {
    pub cfg: ModelConfig,
    embed: Tensor,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Tensor,
    /// [max_position_embeddings, head_dim / 2]
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    device: Device,
    dtype: DType,
    /// Use the gathered (plain candle ops) attention even where a kernel exists (tests).
    force_gathered_attention: bool,
    /// Run the residual add + RMSNorm and SwiGLU as tandem-kernels' fused kernels where they
    /// exist (CUDA); off with TANDEM_CUDA_UNFUSED=1 (to compare on a GPU host).
    fused_elementwise: bool,
    /// Train layers through candle's autograd even where the hand-written CPU layer runs
    /// (`finetune::fused`; tests and benchmarks compare the two).
    pub(crate) autograd_layers: bool,
}

/// Takes named tensors out of a checkpoint map, checking shapes, naming the file on error.
struct Weights<'a> {
    map: HashMap<String, Tensor>,
    src: &'a Path,
}

impl Weights<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .map
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.src.into(),
                tensor: name.into(),
            })?;
        if t.dims() != shape {
            return Err(ModelError::Shape {
                path: self.src.into(),
                tensor: name.into(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t)
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let w = self.take(&format!("{prefix}.weight"), &[out, inp])?;
        let b = if bias {
            Some(self.take(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(w, b))
    }
}

impl Llama {
    /// Builds the model from HF-named tensors (already of `dtype` on `device`). `src` names the
    /// file in errors.
    pub fn from_tensors(
        cfg: ModelConfig,
        map: HashMap<String, Tensor>,
        src: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut w = Weights { map, src };
        let (h, i, q, kv) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.q_dim(),
            cfg.kv_dim(),
        );
        let embed = w.take("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let bias = cfg.attention_bias;
            layers.push(Layer {
                input_norm: w.take(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: w.take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                q: w.linear(&format!("{p}.self_attn.q_proj"), q, h, bias)?,
                k: w.linear(&format!("{p}.self_attn.k_proj"), kv, h, bias)?,
                v: w.linear(&format!("{p}.self_attn.v_proj"), kv, h, bias)?,
                o: w.linear(&format!("{p}.self_attn.o_proj"), h, q, false)?,
                gate: w.linear(&format!("{p}.mlp.gate_proj"), i, h, false)?,
                up: w.linear(&format!("{p}.mlp.up_proj"), i, h, false)?,
                down: w.linear(&format!("{p}.mlp.down_proj"), h, i, false)?,
            });
        }
        let norm = w.take("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings && !w.map.contains_key("lm_head.weight") {
            embed.clone()
        } else {
            w.take("lm_head.weight", &[cfg.vocab_size, h])?
        };
        let mut inv_freq = rope_inv_freq(&cfg);
        if let Some(f) = w.map.remove("rope_freqs.weight") {
            // GGUF's Llama 3 RoPE scaling: per-frequency divisors.
            let f = f.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            if f.len() != inv_freq.len() {
                return Err(ModelError::Shape {
                    path: src.into(),
                    tensor: "rope_freqs.weight".into(),
                    expected: vec![inv_freq.len()],
                    got: vec![f.len()],
                });
            }
            inv_freq.iter_mut().zip(f).for_each(|(x, d)| *x /= d);
        }
        let n = cfg.max_position_embeddings;
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
        for name in w.map.keys() {
            tracing::debug!(tensor = %name, "unused checkpoint tensor");
        }
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            device: device.clone(),
            dtype,
            force_gathered_attention: false,
            fused_elementwise: std::env::var_os("TANDEM_CUDA_UNFUSED").is_none_or(|v| v != "1"),
            autograd_layers: false,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Routes attention through plain candle ops even where tandem-kernels has a kernel
    /// (to check one against the other).
    pub fn set_force_gathered_attention(&mut self, on: bool) {
        self.force_gathered_attention = on;
    }

    /// Runs the residual add + RMSNorm and SwiGLU through candle's separate ops even where
    /// tandem-kernels' fused kernels exist (to measure or check one against the other).
    pub fn set_fused_elementwise(&mut self, on: bool) {
        self.fused_elementwise = on;
    }

    /// Runs training's layer forwards and backwards through candle ops and autograd even on
    /// the CPU in f32, where the hand-written layer (`finetune::fused`) otherwise runs them.
    pub fn set_autograd_layers(&mut self, on: bool) {
        self.autograd_layers = on;
    }

    /// Runs every token of `batch` through the model, writing their K/V into `cache`, and
    /// returns f32 logits [rows, vocab] for the rows `batch.logit_rows()` lists.
    pub fn forward(&self, batch: &PackedBatch, cache: &KvCache) -> Result<Tensor> {
        self.forward_with_lora(batch, cache, None)
    }

    /// `forward`, with segments that name an adapter running through it: every projection
    /// the adapter targets adds its LoRA delta, all segments in one `lora_sgmv` per projection.
    pub fn forward_with_lora(
        &self,
        batch: &PackedBatch,
        cache: &KvCache,
        adapters: Option<&AdapterRegistry>,
    ) -> Result<Tensor> {
        Ok(self.forward_packed(batch, cache, adapters, &[])?.0)
    }

    /// `forward_with_lora` that also keeps, for the segments listed in `capture` (indices into
    /// `batch.segments`), what token-level training needs: each layer's input and the last
    /// layer's output, copied out of the batch's activations.
    pub fn forward_packed(
        &self,
        batch: &PackedBatch,
        cache: &KvCache,
        adapters: Option<&AdapterRegistry>,
        capture: &[usize],
    ) -> Result<(Tensor, Vec<Captured>)> {
        let mut caps: Vec<Captured> = capture
            .iter()
            .map(|&segment| Captured {
                segment,
                inputs: Vec::with_capacity(self.layers.len() + 1),
            })
            .collect();
        if let Some(c) = caps.iter().find(|c| c.segment >= batch.segments.len()) {
            return Err(ModelError::Batch(format!(
                "capture of segment {} in a batch of {}",
                c.segment,
                batch.segments.len()
            )));
        }
        let keep = |x: &Tensor, caps: &mut Vec<Captured>| -> Result<()> {
            for c in caps.iter_mut() {
                let s = &batch.segments[c.segment];
                c.inputs.push(x.narrow(0, s.start, s.len)?.copy()?);
            }
            Ok(())
        };
        let lora = match adapters {
            Some(reg) => LoraBatch::new(reg, batch)?,
            None if batch.segments.iter().any(|s| s.adapter.is_some()) => {
                return Err(ModelError::Batch(
                    "a segment names an adapter but no adapter registry was given".into(),
                ))
            }
            None => None,
        };
        let lin = |l: usize, p: Proj, layer: &Linear, x: &Tensor| -> Result<Tensor> {
            let y = dense_linear(layer, x)?;
            match &lora {
                Some(lb) => lb.apply(l, p, x, y),
                None => Ok(y),
            }
        };
        batch.validate(
            cache.block_size,
            cache.num_blocks,
            self.cfg.max_position_embeddings,
        )?;
        let t = batch.num_tokens();
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let dev = &self.device;
        let tokens = Tensor::new(batch.tokens.as_slice(), dev)?;
        let positions = Tensor::new(batch.positions.as_slice(), dev)?;
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;
        let meta = batch.attention_meta(cache.block_size, self.cfg.sliding_window);
        let scale = 1.0 / (hd as f32).sqrt();
        let eps = self.cfg.rms_norm_eps as f32;

        // The residual stream `x` and its normed copy `h`: each residual add is fused with the
        // norm that reads its result (the next layer's input norm; the final norm after the
        // last layer, over every row: it is per row, so the logit rows are the same bits).
        let mut x = self.embed.index_select(&tokens, 0)?;
        let mut h = match self.layers.first() {
            Some(layer) => candle_nn::ops::rms_norm(&x, &layer.input_norm, eps)?,
            None => candle_nn::ops::rms_norm(&x, &self.norm, eps)?,
        };
        for (l, layer) in self.layers.iter().enumerate() {
            keep(&x, &mut caps)?;
            let q = lin(l, Proj::Q, &layer.q, &h)?.reshape((1, t, nh, hd))?;
            let k = lin(l, Proj::K, &layer.k, &h)?.reshape((1, t, nkv, hd))?;
            let v = lin(l, Proj::V, &layer.v, &h)?.reshape((t, nkv, hd))?;
            let q = candle_nn::rotary_emb::rope_thd(&q.contiguous()?, &cos, &sin)?
                .reshape((t, nh, hd))?;
            let k = candle_nn::rotary_emb::rope_thd(&k.contiguous()?, &cos, &sin)?
                .reshape((t, nkv, hd))?;
            cache.write(l, &k, &v.contiguous()?, &meta)?;
            let attn = self.attention(&q, &cache.k[l], &cache.v[l], &meta, batch, scale)?;
            let o = lin(l, Proj::O, &layer.o, &attn.reshape((t, nh * hd))?)?;
            let (x2, h2) = self.add_norm(&x, &o, &layer.post_norm, eps)?;
            let mlp = self.swiglu(
                &lin(l, Proj::Gate, &layer.gate, &h2)?,
                &lin(l, Proj::Up, &layer.up, &h2)?,
            )?;
            let next_norm = self.layers.get(l + 1).map_or(&self.norm, |n| &n.input_norm);
            (x, h) = self.add_norm(&x2, &lin(l, Proj::Down, &layer.down, &mlp)?, next_norm, eps)?;
        }
        keep(&x, &mut caps)?;
        let rows: Vec<u32> = batch
            .logit_rows()
            .into_iter()
            .map(|(_, t)| t as u32)
            .collect();
        if rows.is_empty() {
            return Ok((
                Tensor::zeros((0, self.cfg.vocab_size), DType::F32, dev)?,
                caps,
            ));
        }
        let h = h.index_select(&Tensor::new(rows.as_slice(), dev)?, 0)?;
        Ok((dense(&h, &self.lm_head)?.to_dtype(DType::F32)?, caps))
    }

    /// `(x + r, rms_norm(x + r) * w)`: one fused kernel where tandem-kernels has it, else
    /// candle's add and RMSNorm (the CPU: its tests pin those bits).
    fn add_norm(&self, x: &Tensor, r: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        if self.fused_elementwise && fused_supported(x.device(), x.dtype()) {
            return Ok(add_rms_norm(x, r, w, eps)?);
        }
        let sum = (x + r)?;
        let normed = candle_nn::ops::rms_norm(&sum, w, eps)?;
        Ok((sum, normed))
    }

    /// `silu(gate) * up`: one fused kernel where tandem-kernels has it, else candle's ops.
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if self.fused_elementwise && fused_supported(gate.device(), gate.dtype()) {
            return Ok(swiglu(gate, up)?);
        }
        Ok((candle_nn::ops::silu(gate)? * up)?)
    }

    /// The token embeddings of `tokens` [len, hidden] (training references).
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        Ok(self
            .embed
            .index_select(&Tensor::new(tokens, &self.device)?, 0)?)
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        meta: &PagedAttentionMeta,
        batch: &PackedBatch,
        scale: f32,
    ) -> Result<Tensor> {
        if paged_attention_supported(&self.device, self.dtype, self.cfg.head_dim)
            && !self.force_gathered_attention
        {
            return Ok(paged_attention(q, k, v, meta, scale)?);
        }
        attention_gathered(q, k, v, meta, batch, scale)
    }
}

/// A linear layer through `tandem_kernels::dense`: on the CPU a row's output is the same bits
/// however the batch around it is made (prefix caching, chunked prefill, co-served rows).
fn dense_linear(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    let y = dense(x, layer.weight())?;
    Ok(match layer.bias() {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Logits as host rows, for sampling.
pub fn logits_to_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}
