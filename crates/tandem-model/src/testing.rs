//! Test fixtures shared by the crates' tests: tiny random Llama-family checkpoints written to
//! disk in HF and GGUF form. Not part of the public API.
#![allow(clippy::unwrap_used)]

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Copy)]
pub struct Tiny {
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub tied: bool,
    pub llama3_rope: bool,
    pub max_pos: usize,
    /// "LlamaForCausalLM", "MistralForCausalLM" or "Qwen2ForCausalLM" (q/k/v biases).
    pub arch: &'static str,
    pub sliding_window: Option<usize>,
}

impl Tiny {
    pub fn gqa() -> Self {
        Self {
            vocab: 96,
            hidden: 64,
            inter: 112,
            layers: 3,
            heads: 8,
            kv_heads: 2,
            tied: false,
            llama3_rope: true,
            max_pos: 512,
            arch: "LlamaForCausalLM",
            sliding_window: None,
        }
    }
    pub fn tied_mha() -> Self {
        Self {
            vocab: 80,
            hidden: 48,
            inter: 96,
            layers: 2,
            heads: 4,
            kv_heads: 4,
            tied: true,
            llama3_rope: false,
            max_pos: 512,
            arch: "LlamaForCausalLM",
            sliding_window: None,
        }
    }
    pub fn model_config(&self) -> crate::ModelConfig {
        crate::ModelConfig::from_hf_value(&self.config_json(), Path::new("config.json")).unwrap()
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    pub fn config_json(&self) -> serde_json::Value {
        let mut v = json!({
            "architectures": [self.arch],
            "vocab_size": self.vocab, "hidden_size": self.hidden, "intermediate_size": self.inter,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": self.max_pos, "tie_word_embeddings": self.tied,
            "bos_token_id": 1, "eos_token_id": 2,
        });
        if self.arch == "Qwen2ForCausalLM" {
            v["use_sliding_window"] = json!(false);
            v["sliding_window"] = json!(self.max_pos);
            v["max_window_layers"] = json!(self.layers);
            v["hidden_act"] = json!("silu");
        } else if let Some(w) = self.sliding_window {
            v["sliding_window"] = json!(w);
        }
        if self.llama3_rope {
            v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        }
        v
    }

    /// Random weights under HF names, reproducible from `seed`.
    pub fn weights(&self, seed: u64) -> HashMap<String, Tensor> {
        let mut rng = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut rand = |shape: &[usize], scale: f32, offset: f32| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    rng = rng
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = ((rng >> 33) as f64 / (1u64 << 31) as f64) as f32; // [0, 1)
                    offset + scale * (2.0 * u - 1.0)
                })
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        let (h, i, q, kv) = (
            self.hidden,
            self.inter,
            self.heads * self.head_dim(),
            self.kv_heads * self.head_dim(),
        );
        let mut m = HashMap::new();
        m.insert(
            "model.embed_tokens.weight".to_string(),
            rand(&[self.vocab, h], 1.0, 0.0),
        );
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            m.insert(format!("{p}.input_layernorm.weight"), rand(&[h], 0.2, 1.0));
            m.insert(
                format!("{p}.post_attention_layernorm.weight"),
                rand(&[h], 0.2, 1.0),
            );
            for (n, o, inp) in [
                ("self_attn.q_proj", q, h),
                ("self_attn.k_proj", kv, h),
                ("self_attn.v_proj", kv, h),
                ("self_attn.o_proj", h, q),
                ("mlp.gate_proj", i, h),
                ("mlp.up_proj", i, h),
                ("mlp.down_proj", h, i),
            ] {
                let scale = 1.0 / (inp as f32).sqrt() * 1.7;
                m.insert(format!("{p}.{n}.weight"), rand(&[o, inp], scale, 0.0));
                if self.arch == "Qwen2ForCausalLM"
                    && ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"].contains(&n)
                {
                    m.insert(format!("{p}.{n}.bias"), rand(&[o], 0.5, 0.0));
                }
            }
        }
        m.insert("model.norm.weight".to_string(), rand(&[h], 0.2, 1.0));
        if !self.tied {
            m.insert(
                "lm_head.weight".to_string(),
                rand(&[self.vocab, h], 0.3, 0.0),
            );
        }
        m
    }

    /// An HF model directory: config.json, model.safetensors, and a word-level tokenizer.json.
    pub fn write_hf_dir(&self, dir: &Path, seed: u64) -> HashMap<String, Tensor> {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), self.config_json().to_string()).unwrap();
        let w = self.weights(seed);
        candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
        let vocab: serde_json::Map<String, serde_json::Value> = (0..self.vocab)
            .map(|i| (format!("w{i}"), json!(i)))
            .collect();
        let tok = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}});
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
        w
    }
}

/// GPT-2's byte -> printable char table used by byte-level BPE vocabularies.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        table[b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// A GGUF file of the same model as llama.cpp writes it: llama.cpp names, Q/K rows permuted for
/// interleaved RoPE, f32 tensors, and a byte-level BPE tokenizer in the metadata
/// (256 byte tokens, a few merges, 3 special tokens; vocab padded to the model's size).
pub fn write_gguf(t: &Tiny, w: &HashMap<String, Tensor>, path: &Path) {
    write_gguf_with_tokenizer(t, w, path, gpt2_tokenizer_meta());
}

/// A byte-level BPE (`gpt2`) tokenizer as GGUF metadata: 256 byte tokens, 4 merges, then
/// `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (ids 260..=262), and a ChatML template.
pub fn gpt2_tokenizer_meta() -> Vec<(String, Value)> {
    let table = bytes_to_unicode();
    let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    let mut types = vec![1i32; 256];
    let merges = ["Ġ t", "h e", "Ġt he", "i n"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(s.to_string());
        types.push(3);
    }
    let n_tok = tokens.len();
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges.iter().map(|m| Value::String(m.to_string())).collect())),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(n_tok as u32 - 2)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(n_tok as u32 - 1)),
        ("tokenizer.chat_template".into(), Value::String("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into())),
    ]
}

/// A SentencePiece (`llama`) tokenizer as GGUF metadata, as llama.cpp writes Llama 2's:
/// `<unk>`, `<s>`, `</s>`, 256 byte tokens `<0xNN>`, then pieces with scores.
pub fn spm_tokenizer_meta() -> Vec<(String, Value)> {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2i32, 3, 3];
    let mut scores = vec![0f32; 3];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    let pieces = [
        "▁", "t", "h", "e", "a", "n", "d", "▁t", "he", "▁the", "an", "▁an", "▁and", "o", "▁to",
    ];
    for (i, p) in pieces.iter().enumerate() {
        tokens.push(p.to_string());
        types.push(1);
        // Longer merges are rarer: lower scores, as in real SentencePiece vocabularies.
        scores.push(-(i as f32));
    }
    vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
    ]
}

/// `write_gguf` with the given tokenizer metadata.
pub fn write_gguf_with_tokenizer(
    t: &Tiny,
    w: &HashMap<String, Tensor>,
    path: &Path,
    tokenizer: Vec<(String, Value)>,
) {
    let permute = |x: &Tensor, n_head: usize| {
        let (rows, cols) = x.dims2().unwrap();
        x.reshape((n_head, 2, rows / n_head / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap()
    };
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, x) in w {
        let g = if name == "model.embed_tokens.weight" {
            "token_embd.weight".to_string()
        } else if name == "model.norm.weight" {
            "output_norm.weight".to_string()
        } else if name == "lm_head.weight" {
            "output.weight".to_string()
        } else {
            let rest = name.strip_prefix("model.layers.").unwrap();
            let (l, tail) = rest.split_once('.').unwrap();
            let m = match tail.strip_suffix(".weight").unwrap() {
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "ffn_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                other => panic!("{other}"),
            };
            format!("blk.{l}.{m}.weight")
        };
        let x = if g.ends_with("attn_q.weight") {
            permute(x, t.heads)
        } else if g.ends_with("attn_k.weight") {
            permute(x, t.kv_heads)
        } else {
            x.clone()
        };
        tensors.push((g, x));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let q: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, x)| (n.clone(), QTensor::quantize(x, GgmlDType::F32).unwrap()))
        .collect();

    let u32v = |x: usize| Value::U32(x as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), u32v(t.layers)),
        ("llama.embedding_length".into(), u32v(t.hidden)),
        ("llama.feed_forward_length".into(), u32v(t.inter)),
        ("llama.attention.head_count".into(), u32v(t.heads)),
        ("llama.attention.head_count_kv".into(), u32v(t.kv_heads)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        ("llama.context_length".into(), u32v(t.max_pos)),
    ];
    meta.extend(tokenizer);
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let q_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &q_refs).unwrap();
}

/// A random LoRA adapter of rank `r` on `targets` of every layer (B non-zero, so the
/// adapter changes the output), reproducible from `seed`.
pub fn random_adapter(
    cfg: &crate::ModelConfig,
    r: usize,
    alpha: f64,
    targets: &[crate::lora::Proj],
    rslora: bool,
    seed: u64,
) -> crate::lora::LoraAdapter {
    use crate::lora::{LoraAdapter, LoraConfig, LoraWeights};
    let mut rng = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(7);
    let mut rand = |shape: (usize, usize), scale: f32| {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                scale * (2.0 * ((rng >> 33) as f32 / (1u64 << 31) as f32) - 1.0)
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let config = LoraConfig {
        r,
        lora_alpha: alpha,
        target_modules: serde_json::json!(targets.iter().map(|p| p.name()).collect::<Vec<_>>()),
        use_rslora: rslora,
        base_model_name_or_path: Some("tiny".into()),
        alpha_pattern: Default::default(),
    };
    let mut weights = std::collections::BTreeMap::new();
    for layer in 0..cfg.num_hidden_layers {
        for &p in targets {
            let (inp, out) = p.dims(cfg);
            let scale = config.scale("", r);
            weights.insert(
                (layer, p),
                LoraWeights {
                    a: rand((r, inp), 0.3),
                    b: rand((out, r), 0.3),
                    scale,
                },
            );
        }
    }
    LoraAdapter { config, weights }
}

/// Seven short training examples over a vocabulary of `vocab` (the first two tokens of each
/// are prompt, the rest targets).
pub fn tiny_examples(vocab: u32) -> Vec<crate::finetune::Example> {
    (0..7)
        .map(|k| {
            let n = 5 + k % 4;
            crate::finetune::Example {
                tokens: (0..n as u32)
                    .map(|i| (i * 3 + k as u32 * 5 + 1) % vocab)
                    .collect(),
                target: (0..n).map(|i| i >= 2).collect(),
            }
        })
        .collect()
}

/// A small training configuration for the tiny models: rank 4 on q/v/down, 2 epochs of
/// batches of 3, chunks of 3 tokens.
pub fn tiny_train_config() -> crate::finetune::TrainConfig {
    crate::finetune::TrainConfig {
        r: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        lr: 1e-2,
        batch_size: 3,
        epochs: 2,
        chunk_tokens: 3,
        seed: 5,
        ..Default::default()
    }
}

/// The largest absolute difference between two adapters' weights (same modules and shapes).
pub fn adapter_max_abs_diff(a: &crate::lora::LoraAdapter, b: &crate::lora::LoraAdapter) -> f32 {
    assert_eq!(
        a.weights.keys().collect::<Vec<_>>(),
        b.weights.keys().collect::<Vec<_>>(),
        "the adapters target different modules"
    );
    let diff = |x: &Tensor, y: &Tensor| {
        (x - y)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("same shapes")
    };
    a.weights
        .iter()
        .map(|(k, w)| {
            let v = &b.weights[k];
            diff(&w.a, &v.a).max(diff(&w.b, &v.b))
        })
        .fold(0f32, f32::max)
}

/// A JSON value decoded from fuzz bytes, for structure-aware fuzzing of JSON readers: keys drawn
/// from `keys` (the reader's own field names, which also appear as string values), values of
/// every JSON kind (numbers at the edges included), nested a few levels.
pub fn json_from(bytes: &[u8], keys: &[&str]) -> serde_json::Value {
    fn take(b: &mut &[u8]) -> u8 {
        match b.split_first() {
            Some((x, rest)) => {
                *b = rest;
                *x
            }
            None => 0,
        }
    }
    fn value(b: &mut &[u8], keys: &[&str], depth: usize) -> serde_json::Value {
        use serde_json::Value as V;
        match take(b) % if depth > 3 { 7 } else { 9 } {
            0 => V::Null,
            1 => V::Bool(take(b) & 1 == 1),
            2 => serde_json::json!(take(b) as i64 - 100),
            3 => serde_json::json!((take(b) as f64 - 128.0) / 7.0),
            4 => {
                let n = (take(b) % 24) as usize;
                V::String((0..n).map(|_| take(b) as char).collect())
            }
            5 => match take(b) % 4 {
                0 => serde_json::json!(u64::MAX),
                1 => serde_json::json!(i64::MIN),
                2 => serde_json::json!(1e300),
                _ => serde_json::json!(-0.0),
            },
            6 => V::String(keys[take(b) as usize % keys.len()].to_string()),
            7 => {
                let n = (take(b) % 4) as usize;
                V::Array((0..n).map(|_| value(b, keys, depth + 1)).collect())
            }
            _ => {
                let n = (take(b) % 6) as usize;
                let mut m = serde_json::Map::new();
                for _ in 0..n {
                    let k = keys[take(b) as usize % keys.len()];
                    m.insert(k.to_string(), value(b, keys, depth + 1));
                }
                V::Object(m)
            }
        }
    }
    let mut b = bytes;
    value(&mut b, keys, 0)
}
