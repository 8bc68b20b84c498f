//! The packed engine against candle-transformers' Llama on tiny random checkpoints written to
//! disk and read back through tandem's loader.

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::llama as reference;
use tandem_model::testing::{self as common, Tiny};
use tandem_model::{load_checkpoint, KvCache, Llama, LogitsWanted, PackedBatch};

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn reference_config(t: &Tiny) -> reference::Config {
    let cfg: reference::LlamaConfig = serde_json::from_value(t.config_json()).unwrap();
    cfg.into_config(false)
}

/// Per-position logits from candle-transformers, feeding one token at a time through its cache.
fn reference_logits(t: &Tiny, dir: &std::path::Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let (_, map, _) = load_checkpoint(dir, &dev, DType::F32).unwrap();
    let rcfg = reference_config(t);
    let vb = candle_nn::VarBuilder::from_tensors(map, DType::F32, &dev);
    let model = reference::Llama::load(vb, &rcfg).unwrap();
    let mut cache = reference::Cache::new(true, DType::F32, &rcfg, &dev).unwrap();
    tokens
        .iter()
        .enumerate()
        .map(|(pos, &tok)| {
            let x = Tensor::new(&[tok], &dev).unwrap().unsqueeze(0).unwrap();
            model
                .forward(&x, pos, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn ours(
    dir: &std::path::Path,
    tokens: &[u32],
    block_table: Vec<u32>,
    block_size: usize,
    gathered: bool,
) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let (cfg, map, src) = load_checkpoint(dir, &dev, DType::F32).unwrap();
    let mut model = Llama::from_tensors(cfg.clone(), map, &src, &dev, DType::F32).unwrap();
    model.set_force_gathered_attention(gathered);
    let cache = KvCache::new(
        cfg.num_hidden_layers,
        16,
        block_size,
        cfg.num_key_value_heads,
        cfg.head_dim,
        DType::F32,
        &dev,
    )
    .unwrap();
    let mut b = PackedBatch::default();
    b.push(0, tokens, 0, block_table, LogitsWanted::All);
    model.forward(&b, &cache).unwrap().to_vec2::<f32>().unwrap()
}

fn check(t: Tiny, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), seed);
    let tokens: Vec<u32> = (0..37).map(|i| ((i * 31 + 7) % t.vocab) as u32).collect();
    let want = reference_logits(&t, dir.path(), &tokens);
    // Non-contiguous, out-of-order blocks of 8 tokens.
    let table = vec![9, 2, 14, 0, 5];
    for gathered in [false, true] {
        let got = ours(dir.path(), &tokens, table.clone(), 8, gathered);
        assert_eq!(got.len(), tokens.len());
        for (pos, (g, w)) in got.iter().zip(&want).enumerate() {
            let d = max_abs_diff(g, w);
            assert!(
                d <= 1e-4,
                "position {pos} (gathered attention: {gathered}): max |diff| {d}"
            );
        }
    }
}

#[test]
fn gqa_with_llama3_rope_matches_candle_transformers() {
    check(Tiny::gqa(), 1);
}

#[test]
fn tied_embeddings_match_candle_transformers() {
    check(Tiny::tied_mha(), 2);
}

#[test]
fn gguf_with_permuted_qk_gives_the_same_logits_as_safetensors() {
    // A GGUF written the way llama.cpp writes it (Q/K rows permuted) must load back in HF layout.
    let t = Tiny {
        vocab: 263,
        llama3_rope: false,
        ..Tiny::gqa()
    };
    let dir = tempfile::tempdir().unwrap();
    let w = t.write_hf_dir(dir.path(), 3);
    let gguf = dir.path().join("tiny.gguf");
    common::write_gguf(&t, &w, &gguf);
    let tokens: Vec<u32> = (0..20).map(|i| ((i * 13 + 3) % t.vocab) as u32).collect();
    let a = ours(dir.path(), &tokens, vec![0, 1, 2], 8, false);
    let b = ours(&gguf, &tokens, vec![0, 1, 2], 8, false);
    for (g, w) in a.iter().zip(&b) {
        assert_eq!(max_abs_diff(g, w), 0.0);
    }
}

#[test]
fn qwen2_with_qkv_bias_matches_candle_transformers() {
    use candle_transformers::models::qwen2;
    let t = Tiny {
        arch: "Qwen2ForCausalLM",
        llama3_rope: false,
        ..Tiny::gqa()
    };
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 8);
    let dev = Device::Cpu;
    let (_, map, _) = load_checkpoint(dir.path(), &dev, DType::F32).unwrap();
    let rcfg: qwen2::Config = serde_json::from_value(t.config_json()).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(map, DType::F32, &dev);
    let mut model = qwen2::ModelForCausalLM::new(&rcfg, vb).unwrap();
    let tokens: Vec<u32> = (0..23).map(|i| ((i * 19 + 5) % t.vocab) as u32).collect();
    let want: Vec<Vec<f32>> = tokens
        .iter()
        .enumerate()
        .map(|(pos, &tok)| {
            let x = Tensor::new(&[tok], &dev).unwrap().unsqueeze(0).unwrap();
            model
                .forward(&x, pos)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect();
    for gathered in [false, true] {
        let got = ours(dir.path(), &tokens, vec![3, 1, 0], 8, gathered);
        for (pos, (g, w)) in got.iter().zip(&want).enumerate() {
            let d = max_abs_diff(g, w);
            assert!(
                d <= 1e-4,
                "position {pos} (gathered: {gathered}): max |diff| {d}"
            );
        }
    }
}

#[test]
fn mistral_sliding_window_kernel_equals_gathered_and_changes_late_logits() {
    let t = Tiny {
        arch: "MistralForCausalLM",
        sliding_window: Some(6),
        llama3_rope: false,
        ..Tiny::gqa()
    };
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 9);
    let tokens: Vec<u32> = (0..21).map(|i| ((i * 23 + 2) % t.vocab) as u32).collect();
    let kernel = ours(dir.path(), &tokens, vec![4, 9, 1], 8, false);
    let gathered = ours(dir.path(), &tokens, vec![4, 9, 1], 8, true);
    for (pos, (a, b)) in kernel.iter().zip(&gathered).enumerate() {
        assert!(max_abs_diff(a, b) <= 1e-5, "position {pos}");
    }
    // The same weights without the window: equal while the window covers everything, then not.
    let full = Tiny {
        sliding_window: None,
        ..t
    };
    let dir2 = tempfile::tempdir().unwrap();
    full.write_hf_dir(dir2.path(), 9);
    let unwindowed = ours(dir2.path(), &tokens, vec![4, 9, 1], 8, false);
    for pos in 0..6 {
        assert!(
            max_abs_diff(&kernel[pos], &unwindowed[pos]) <= 1e-5,
            "position {pos}"
        );
    }
    assert!(max_abs_diff(&kernel[20], &unwindowed[20]) > 1e-3);
}
