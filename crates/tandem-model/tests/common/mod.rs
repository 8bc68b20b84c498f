//! Helpers the token-level training tests share: a tiny model, a LoRA with non-zero B, a
//! cache and registry, labels, and gradient comparisons.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use tandem_model::finetune::{LoraSpec, TrainableLora, Unit};
use tandem_model::lora::{AdapterRegistry, Proj, RegistryConfig};
use tandem_model::testing::Tiny;
use tandem_model::{load_checkpoint, KvCache, Llama, LogitsWanted, PackedBatch, TextTokenizer};

pub fn model(t: &Tiny) -> (tempfile::TempDir, Llama) {
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 3);
    let m = load(dir.path());
    (dir, m)
}

pub fn load(dir: &Path) -> Llama {
    let (cfg, map, src) = load_checkpoint(dir, &Device::Cpu, DType::F32).unwrap();
    Llama::from_tensors(cfg, map, &src, &Device::Cpu, DType::F32).unwrap()
}

/// Rank-8 LoRA on all seven projections with non-zero B (so that every gradient is non-zero).
pub fn lora(m: &Llama, seed: u64) -> TrainableLora {
    let spec = LoraSpec {
        r: 8,
        alpha: 16.0,
        targets: Proj::ALL.to_vec(),
        use_rslora: false,
    };
    let l = TrainableLora::new(&m.cfg, spec, &Device::Cpu, seed).unwrap();
    for (i, (_, v)) in l.named_params().iter().enumerate() {
        if v.dims()[1] == 8 {
            let t = Tensor::randn(0f32, 0.2, v.dims(), &Device::Cpu).unwrap();
            v.set(&t).unwrap();
        }
        let _ = i;
    }
    l
}

pub fn labels(tokens: &[u32], target: &[bool]) -> Vec<Option<u32>> {
    (0..tokens.len())
        .map(|i| (i + 1 < tokens.len() && target[i + 1]).then(|| tokens[i + 1]))
        .collect()
}

/// A KV cache of `blocks` blocks of 4 slots and a registry of `max_loras` rank-8 slots for `m`.
pub fn cache_and_registry(
    m: &Llama,
    blocks: usize,
    max_loras: usize,
) -> (KvCache, AdapterRegistry) {
    let c = &m.cfg;
    let cache = KvCache::new(
        c.num_hidden_layers,
        blocks,
        4,
        c.num_key_value_heads,
        c.head_dim,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let reg = AdapterRegistry::new(
        RegistryConfig {
            max_loras,
            max_lora_rank: 8,
        },
        c,
        &Device::Cpu,
        DType::F32,
    );
    (cache, reg)
}

/// Runs every forward chunk of `unit` (its KV through `table`): reference passes through
/// `reference` (None: the base model), policy chunks through `train`.
pub fn run_forwards(
    m: &Llama,
    cache: &KvCache,
    reg: &AdapterRegistry,
    unit: &mut Unit,
    table: &[u32],
    train: u32,
    reference: Option<u32>,
) {
    while let Some(c) = unit.next_forward_max(usize::MAX) {
        let adapter = if c.id.reference {
            reference
        } else {
            Some(train)
        };
        let mut batch = PackedBatch::default();
        batch.push_with_adapter(
            0,
            &c.tokens,
            c.start,
            c.table(table),
            LogitsWanted::None,
            adapter,
        );
        let (_, mut caps) = m.forward_packed(&batch, cache, Some(reg), &[0]).unwrap();
        unit.finish_forward(m, c.id, caps.pop().unwrap().inputs)
            .unwrap();
    }
}

/// max |t| as f32.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_rel_err(got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>) -> f32 {
    assert_eq!(got.len(), want.len());
    let mut worst = 0f32;
    for (name, w) in want {
        let g = &got[name];
        let diff = max_abs(&(g - w).unwrap());
        let scale = max_abs(w);
        assert!(scale > 0.0, "{name}: zero reference gradient");
        worst = worst.max(diff / scale);
    }
    worst
}

/// A word-level tokenizer over `words` (split on whitespace and punctuation) with a chat
/// template that marks each turn with its role.
pub fn tokenizer(dir: &Path) -> TextTokenizer {
    let words = [
        "<unk>",
        "<",
        ">",
        "</",
        "user",
        "assistant",
        "system",
        "end",
        "hello",
        "hi",
        "there",
        "how",
        "are",
        "you",
        "fine",
        "thanks",
        "be",
        "brief",
        "q",
        "a",
        "text",
        "only",
    ];
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i.into()))
        .collect();
    let tok = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}});
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let tpl = "{% for m in messages %}<{{ m.role }}> {{ m.content }} </end> {% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}";
    let cfg = serde_json::json!({"chat_template": tpl, "eos_token": "end"});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    TextTokenizer::from_hf_dir(dir, &[7]).unwrap()
}

pub fn words(tok: &TextTokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&i| tok.decode(&[i], false).unwrap())
        .collect()
}
