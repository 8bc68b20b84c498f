//! Loading a GGUF file (llama.cpp's format): config from metadata, weights dequantized and
//! renamed to HF names, with llama.cpp's Q/K row permutation undone so that everything,
//! adapters included, is in HF layout.

use crate::config::ModelConfig;
use crate::error::{candle_message, ModelError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

pub const GGUF_ARCHITECTURES: &str = "llama, qwen2";

/// A parsed GGUF header plus an open reader for its tensor data.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| ModelError::Corrupt {
            path: path.into(),
            format: "GGUF",
            msg: candle_message(&e),
        })?;
        Ok(Self {
            path: path.into(),
            content,
            reader,
        })
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_str(&self, key: &str) -> Result<Option<&str>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => v
                .to_string()
                .map(|s| Some(s.as_str()))
                .map_err(|_| ModelError::field(&self.path, key, "not a string")),
        }
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => v
                .to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
                .map(Some)
                .map_err(|_| ModelError::field(&self.path, key, "not an integer")),
        }
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => v
                .to_f32()
                .map(f64::from)
                .or_else(|_| v.to_f64())
                .map(Some)
                .map_err(|_| ModelError::field(&self.path, key, "not a number")),
        }
    }

    pub fn architecture(&self) -> Result<String> {
        let arch = self
            .meta_str("general.architecture")?
            .ok_or_else(|| ModelError::field(&self.path, "general.architecture", "missing"))?;
        if !GGUF_ARCHITECTURES.split(", ").any(|a| a == arch) {
            return Err(ModelError::UnsupportedArchitecture {
                path: self.path.clone(),
                arch: arch.into(),
                supported: GGUF_ARCHITECTURES,
            });
        }
        Ok(arch.into())
    }

    /// The model config from `{arch}.*` metadata.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.architecture()?;
        let req = |k: &str| -> Result<usize> {
            let key = format!("{arch}.{k}");
            self.meta_u64(&key)?
                .map(|x| x as usize)
                .ok_or_else(|| ModelError::field(&self.path, key, "missing"))
        };
        let heads = req("attention.head_count")?;
        let hidden = req("embedding_length")?;
        let kv_heads = self
            .meta_u64(&format!("{arch}.attention.head_count_kv"))?
            .map(|x| x as usize)
            .unwrap_or(heads);
        let head_dim = match self.meta_u64(&format!("{arch}.attention.key_length"))? {
            Some(h) => h as usize,
            None if heads > 0 => hidden / heads,
            None => 0,
        };
        let n_tokens = match self.meta("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => Some(a.len()),
            _ => None,
        };
        let vocab_size = match self.meta_u64(&format!("{arch}.vocab_size"))? {
            Some(v) => v as usize,
            None => match self.content.tensor_infos.get("token_embd.weight") {
                Some(info) => info.shape.dims()[0],
                None => n_tokens.ok_or_else(|| {
                    ModelError::field(&self.path, format!("{arch}.vocab_size"), "missing")
                })?,
            },
        };
        let cfg = ModelConfig {
            architecture: arch.clone(),
            vocab_size,
            hidden_size: hidden,
            intermediate_size: req("feed_forward_length")?,
            num_hidden_layers: req("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: self
                .meta_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: self
                .meta_f64(&format!("{arch}.rope.freq_base"))?
                .unwrap_or(10_000.0),
            rope_scaling: match (
                self.meta_str(&format!("{arch}.rope.scaling.type"))?,
                self.meta_f64(&format!("{arch}.rope.scaling.factor"))?,
            ) {
                (Some("linear"), Some(factor)) => {
                    Some(crate::config::RopeScaling::Linear { factor })
                }
                _ => None,
            },
            max_position_embeddings: self
                .meta_u64(&format!("{arch}.context_length"))?
                .unwrap_or(4096) as usize,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            bos_token_id: self
                .meta_u64("tokenizer.ggml.bos_token_id")?
                .map(|x| x as u32),
            eos_token_ids: self
                .meta_u64("tokenizer.ggml.eos_token_id")?
                .map(|x| vec![x as u32])
                .unwrap_or_default(),
            sliding_window: None,
        };
        cfg.validate(&self.path)?;
        Ok(cfg)
    }

    /// Every tensor, dequantized, converted to `dtype` on `device`, under its HF name.
    /// `rope_freqs.weight` (Llama 3 RoPE scaling as per-frequency divisors) is returned as is.
    pub fn load_tensors(
        &mut self,
        cfg: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        let mut out = HashMap::new();
        for name in names {
            let Some(hf) = hf_name(&name) else {
                tracing::warn!(tensor = %name, file = %self.path.display(), "ignoring unknown GGUF tensor");
                continue;
            };
            let err = |msg: String| ModelError::Tensor {
                path: self.path.clone(),
                tensor: name.clone(),
                msg,
            };
            let q = self
                .content
                .tensor(&mut self.reader, &name, &Device::Cpu)
                .map_err(|e| {
                    err(format!(
                        "cannot read (file truncated or corrupt?): {}",
                        candle_message(&e)
                    ))
                })?;
            let mut t = q
                .dequantize(&Device::Cpu)
                .map_err(|e| err(candle_message(&e)))?;
            if cfg.architecture == "llama" {
                if name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias") {
                    t = unpermute_rows(&t, cfg.num_attention_heads)
                        .map_err(|e| err(candle_message(&e)))?;
                } else if name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias") {
                    t = unpermute_rows(&t, cfg.num_key_value_heads)
                        .map_err(|e| err(candle_message(&e)))?;
                }
            }
            let t = if hf == "rope_freqs.weight" {
                t
            } else {
                t.to_dtype(dtype)
                    .and_then(|t| t.to_device(device))
                    .map_err(|e| err(candle_message(&e)))?
            };
            out.insert(hf, t);
        }
        Ok(out)
    }
}

/// llama.cpp stores each head's Q/K rows as interleaved pairs (for its rotate-adjacent RoPE);
/// HF stores the two halves of each head one after the other. Undo that permutation.
fn unpermute_rows(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / n_head / 2;
    t.reshape((n_head, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The HF checkpoint name of a GGUF tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    let direct = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        "rope_freqs.weight" => Some("rope_freqs.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.into());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() -> candle_core::Result<()> {
        // llama.cpp's convert script: w.reshape(n_head, 2, half, in).swapaxes(1, 2).reshape(rows, in)
        let (n_head, head_dim, cols) = (3usize, 4usize, 5usize);
        let hf = Tensor::arange(0f32, (n_head * head_dim * cols) as f32, &Device::Cpu)?
            .reshape((n_head * head_dim, cols))?;
        let permuted = hf
            .reshape((n_head, 2, head_dim / 2, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n_head * head_dim, cols))?;
        let back = unpermute_rows(&permuted, n_head)?;
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn gguf_names_map_to_hf() {
        assert_eq!(
            hf_name("blk.12.attn_k.weight").as_deref(),
            Some("model.layers.12.self_attn.k_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight").as_deref(),
            Some("model.layers.0.mlp.down_proj.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.x.attn_k.weight"), None);
    }
}
