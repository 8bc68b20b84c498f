//! Broken checkpoints give errors that name the file and the tensor or field, never a panic.

use candle_core::{DType, Device, Tensor};
use std::path::Path;
use tandem_model::testing::{write_gguf, Tiny};
use tandem_model::{load_model, ModelError};

fn load_err(path: &Path) -> String {
    match load_model(Some(path), &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

fn hf_dir() -> (tempfile::TempDir, Tiny) {
    let t = Tiny::tied_mha();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 11);
    (dir, t)
}

#[test]
fn a_good_hf_dir_loads() {
    let (dir, t) = hf_dir();
    let m = load_model(Some(dir.path()), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(m.model.cfg.vocab_size, t.vocab);
    assert_eq!(m.tokenizer.encode("w3 w5", false).unwrap(), vec![3, 5]);
}

#[test]
fn missing_path() {
    let err = load_err(Path::new("/nonexistent/model.gguf"));
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
}

#[test]
fn truncated_safetensors() {
    let (dir, _) = hf_dir();
    let f = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn garbage_safetensors() {
    let (dir, _) = hf_dir();
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json",
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("safetensors"),
        "{err}"
    );
}

#[test]
fn missing_tensor_and_wrong_shape() {
    let (dir, t) = hf_dir();
    let mut w = t.weights(11);
    w.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&w, dir.path().join("model.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("missing"),
        "{err}"
    );

    let mut w = t.weights(11);
    w.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros((7, t.hidden), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&w, dir.path().join("model.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.weight") && err.contains("[7, 48]"),
        "{err}"
    );
}

#[test]
fn unsupported_dtype_names_the_tensor() {
    let (dir, t) = hf_dir();
    let mut w = t.weights(11);
    w.insert(
        "model.norm.weight".into(),
        Tensor::zeros(t.hidden, DType::I64, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&w, dir.path().join("model.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.norm.weight") && err.contains("I64"),
        "{err}"
    );
}

#[test]
fn unsupported_architecture_and_bad_fields() {
    let (dir, t) = hf_dir();
    let mut cfg = t.config_json();
    cfg["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("GPT2LMHeadModel"),
        "{err}"
    );

    let mut cfg = t.config_json();
    cfg["num_key_value_heads"] = serde_json::json!(3);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("num_key_value_heads"), "{err}");

    let mut cfg = t.config_json();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("hidden_size"),
        "{err}"
    );

    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json") && err.contains("JSON"), "{err}");
}

#[test]
fn sharded_checkpoint_loads_and_missing_shard_is_named() {
    let (dir, t) = hf_dir();
    let w = t.weights(11);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let (a, b): (Vec<_>, Vec<_>) = w.into_iter().partition(|(k, _)| k.contains("layers.0"));
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        for (k, _) in &part {
            map.insert(k.clone(), serde_json::json!(file));
        }
        let part: std::collections::HashMap<_, _> = part.into_iter().collect();
        candle_core::safetensors::save(&part, dir.path().join(file)).unwrap();
    }
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    load_model(Some(dir.path()), &Device::Cpu, DType::F32).unwrap();
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

fn gguf() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = Tiny {
        vocab: 263,
        ..Tiny::gqa()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&t, &t.weights(12), &path);
    (dir, path)
}

#[test]
fn gguf_tokenizer_and_chat_template_come_from_metadata() {
    let (_dir, path) = gguf();
    let m = load_model(Some(&path), &Device::Cpu, DType::F32).unwrap();
    let tok = &m.tokenizer;
    for text in [
        "the thin tin",
        "Hello, wörld! 1234 ☃",
        "  spaces\tand\nlines ",
        "<|im_start|>user\nhi<|im_end|>",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    // Merges apply ("Ġthe" is one token), digits split one by one, specials are single tokens.
    let the = tok.token_to_id("Ġthe").unwrap();
    assert!(tok.encode("in the", false).unwrap().contains(&the));
    assert_eq!(tok.encode("12", false).unwrap().len(), 2);
    assert_eq!(tok.encode("<|im_end|>", false).unwrap(), vec![262]);
    assert!(tok.eos_token_ids.contains(&262));
    let chat = tok
        .apply_chat_template(&[tandem_model::ChatMessage::new("user", "hi")], true)
        .unwrap();
    assert_eq!(
        chat,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn truncated_gguf_names_file_and_tensor() {
    let (_dir, path) = gguf();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let err = load_err(&path);
    assert!(
        err.contains("tiny.gguf") && err.contains("tensor `") && err.contains("truncated"),
        "{err}"
    );
    // Cut inside the header.
    std::fs::write(&path, &bytes[..200]).unwrap();
    let err = load_err(&path);
    assert!(
        err.contains("tiny.gguf") && err.contains("not a valid GGUF file"),
        "{err}"
    );
}

#[test]
fn corrupt_gguf_magic() {
    let (_dir, path) = gguf();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..4].copy_from_slice(b"NOPE");
    std::fs::write(&path, &bytes).unwrap();
    let err = load_err(&path);
    assert!(
        err.contains("tiny.gguf") && err.contains("not a valid GGUF file"),
        "{err}"
    );
    assert!(matches!(
        load_model(Some(&path), &Device::Cpu, DType::F32),
        Err(ModelError::Corrupt { .. })
    ));
}

#[test]
fn gguf_sentencepiece_tokenizer_merges_by_score_and_falls_back_to_bytes() {
    use tandem_model::testing::{spm_tokenizer_meta, write_gguf_with_tokenizer};
    let t = Tiny {
        vocab: 274,
        ..Tiny::gqa()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spm.gguf");
    write_gguf_with_tokenizer(&t, &t.weights(13), &path, spm_tokenizer_meta());
    let m = load_model(Some(&path), &Device::Cpu, DType::F32).unwrap();
    let tok = &m.tokenizer;
    let id = |s: &str| tok.token_to_id(s).unwrap();
    // BOS added, the dummy-prefix space, whole pieces merged.
    assert_eq!(
        tok.encode("the and", true).unwrap(),
        vec![1, id("▁the"), id("▁and")]
    );
    // Characters outside the vocabulary fall back to their UTF-8 bytes.
    let ids = tok.encode("é", false).unwrap();
    assert_eq!(ids, vec![id("▁"), id("<0xC3>"), id("<0xA9>")]);
    for text in ["the and", "to the end", "héllo wörld\nnew line", "a  b"] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    assert_eq!(tok.eos_token_ids, vec![2]);
}
