//! Model configuration: one struct for every supported Llama-family model, read from an HF
//! `config.json` or from GGUF metadata.

use crate::error::{ModelError, Result};
use serde_json::Value;
use std::path::Path;

/// Supported HF `architectures` entries.
pub const HF_ARCHITECTURES: &str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";

/// Llama 3 style frequency-dependent RoPE scaling, or plain linear position scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    Linear {
        factor: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Sliding-window attention span in tokens (Mistral v0.1), None for full attention.
    pub sliding_window: Option<usize>,
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Weights every token is multiplied by: the decoder layers' projections and the LM head
    /// (the tied embedding counts once, as the head). What a decode step reads, and the N of
    /// the usual 2N forward FLOPs per token.
    pub fn matmul_params(&self) -> usize {
        let (h, q, kv, i) = (
            self.hidden_size,
            self.q_dim(),
            self.kv_dim(),
            self.intermediate_size,
        );
        self.num_hidden_layers * (h * q + 2 * h * kv + q * h + 3 * h * i) + self.vocab_size * h
    }

    /// Checks the relations between sizes that the engine relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ModelError::field(path, name, "must be > 0"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(ModelError::field(
                path,
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ModelError::field(path, "head_dim", "must be even for RoPE"));
        }
        Ok(())
    }

    /// Parses an HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
            path: path.into(),
            format: "JSON",
            msg: e.to_string(),
        })?;
        Self::from_hf_value(&v, path)
    }

    pub fn from_hf_value(v: &Value, path: &Path) -> Result<Self> {
        let arch = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ModelError::field(path, "architectures", "missing or not a list of strings")
            })?
            .to_string();
        if !HF_ARCHITECTURES.split(", ").any(|a| a == arch) {
            return Err(ModelError::UnsupportedArchitecture {
                path: path.into(),
                arch,
                supported: HF_ARCHITECTURES,
            });
        }
        let usize_field = |name: &str| -> Result<usize> {
            v.get(name)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| {
                    ModelError::field(path, name, "missing or not a non-negative integer")
                })
        };
        let opt_usize = |name: &str| -> Result<Option<usize>> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|x| Some(x as usize))
                    .ok_or_else(|| ModelError::field(path, name, "not a non-negative integer")),
            }
        };
        let opt_f64 = |name: &str| -> Result<Option<f64>> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| ModelError::field(path, name, "not a number")),
            }
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        let num_key_value_heads = opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = match opt_usize("head_dim")? {
            Some(h) => h,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => 0,
        };
        let is_qwen2 = arch == "Qwen2ForCausalLM";
        let attention_bias = match v.get("attention_bias") {
            Some(Value::Bool(b)) => *b,
            _ => is_qwen2,
        };
        let eos_token_ids = match v.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|x| x as u32))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ModelError::field(path, "eos_token_id", "not a list of integers"))?,
            Some(x) => vec![x
                .as_u64()
                .ok_or_else(|| ModelError::field(path, "eos_token_id", "not an integer"))?
                as u32],
        };
        let sliding_window = if is_qwen2 {
            // Qwen2 checkpoints ship with use_sliding_window false; the layered variant is not supported.
            if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
                return Err(ModelError::field(
                    path,
                    "use_sliding_window",
                    "Qwen2 sliding-window attention is not supported",
                ));
            }
            None
        } else {
            opt_usize("sliding_window")?
        };
        let cfg = Self {
            architecture: arch,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: opt_f64("rope_theta")?.unwrap_or(10_000.0),
            rope_scaling: parse_rope_scaling(v.get("rope_scaling"), path)?,
            max_position_embeddings: opt_usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            attention_bias,
            bos_token_id: opt_usize("bos_token_id")?.map(|x| x as u32),
            eos_token_ids,
            sliding_window,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

fn parse_rope_scaling(v: Option<&Value>, path: &Path) -> Result<Option<RopeScaling>> {
    let Some(v) = v else { return Ok(None) };
    if v.is_null() {
        return Ok(None);
    }
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .ok_or_else(|| ModelError::field(path, "rope_scaling.rope_type", "missing"))?;
    let num = |name: &str| -> Result<f64> {
        v.get(name).and_then(Value::as_f64).ok_or_else(|| {
            ModelError::field(
                path,
                format!("rope_scaling.{name}"),
                "missing or not a number",
            )
        })
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        })),
        other => Err(ModelError::field(
            path,
            "rope_scaling.rope_type",
            format!("`{other}` is not supported (supported: default, linear, llama3)"),
        )),
    }
}

/// RoPE inverse frequencies for each pair of dimensions, with scaling applied.
pub fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    let base: Vec<f64> = (0..cfg.head_dim)
        .step_by(2)
        .map(|i| 1.0 / cfg.rope_theta.powf(i as f64 / cfg.head_dim as f64))
        .collect();
    match &cfg.rope_scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.into_iter().map(|f| f / factor).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.into_iter()
                .map(|freq| {
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect()
        }
    }
}
