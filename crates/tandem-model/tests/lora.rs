//! LoRA through the whole model: a packed batch mixing adapters of ranks 4, 8, 16 and 64 with
//! base-only segments equals each request run alone on merged weights W + scale·B·A; the PEFT
//! format round-trips; the registry evicts idle adapters only; broken adapters get clear errors.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use tandem_model::lora::{AdapterRegistry, LoraAdapter, Proj, RegistryConfig};
use tandem_model::testing::{random_adapter, Tiny};
use tandem_model::{load_checkpoint, KvCache, Llama, LogitsWanted, PackedBatch};

fn tiny() -> Tiny {
    Tiny {
        llama3_rope: false,
        ..Tiny::gqa()
    }
}

fn base(dir: &Path) -> (Llama, HashMap<String, Tensor>) {
    let (cfg, map, src) = load_checkpoint(dir, &Device::Cpu, DType::F32).unwrap();
    (
        Llama::from_tensors(cfg, map.clone(), &src, &Device::Cpu, DType::F32).unwrap(),
        map,
    )
}

fn cache(m: &Llama) -> KvCache {
    let c = &m.cfg;
    KvCache::new(
        c.num_hidden_layers,
        32,
        4,
        c.num_key_value_heads,
        c.head_dim,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// The base model with every adapted weight replaced by W + scale·B·A.
fn merged(dir: &Path, map: &HashMap<String, Tensor>, a: &LoraAdapter) -> Llama {
    let mut map = map.clone();
    for ((layer, p), w) in &a.weights {
        let name = format!("model.layers.{layer}.{}.{}.weight", p.parent(), p.name());
        let delta = (w.b.matmul(&w.a).unwrap() * w.scale).unwrap();
        let merged = (&map[&name] + delta).unwrap();
        map.insert(name, merged);
    }
    let (cfg, _, src) = load_checkpoint(dir, &Device::Cpu, DType::F32).unwrap();
    Llama::from_tensors(cfg, map, &src, &Device::Cpu, DType::F32).unwrap()
}

fn alone(m: &Llama, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut b = PackedBatch::default();
    b.push(
        0,
        tokens,
        0,
        (0..tokens.len().div_ceil(4) as u32).collect(),
        LogitsWanted::All,
    );
    m.forward(&b, &cache(m)).unwrap().to_vec2::<f32>().unwrap()
}

fn rel_err(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    let max = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    diff / max
}

fn adapters(t: &Tiny) -> Vec<LoraAdapter> {
    use Proj::*;
    vec![
        random_adapter(&t.model_config(), 4, 8.0, &Proj::ALL, false, 1),
        random_adapter(&t.model_config(), 8, 16.0, &[Q, V], false, 2),
        random_adapter(&t.model_config(), 16, 8.0, &[O, Gate, Up, Down], true, 3),
        random_adapter(&t.model_config(), 64, 32.0, &Proj::ALL, false, 4),
    ]
}

#[test]
fn mixed_adapters_in_one_batch_equal_merged_weights_per_request() {
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 31);
    let (model, map) = base(dir.path());
    let ads = adapters(&t);
    let mut reg = AdapterRegistry::new(
        RegistryConfig {
            max_loras: 4,
            max_lora_rank: 64,
        },
        &model.cfg,
        &Device::Cpu,
        DType::F32,
    );
    let mut ids = vec![];
    for (i, a) in ads.iter().enumerate() {
        let p = dir.path().join(format!("adapter{i}"));
        a.save(&p).unwrap();
        ids.push(reg.register(&format!("a{i}"), &p).unwrap());
    }
    // (adapter index or none, prompt length)
    let plan: Vec<(Option<usize>, usize)> = vec![
        (Some(0), 5),
        (None, 4),
        (Some(1), 7),
        (Some(2), 3),
        (None, 2),
        (Some(3), 6),
        (Some(0), 1),
    ];
    let seqs: Vec<Vec<u32>> = plan
        .iter()
        .enumerate()
        .map(|(s, &(_, n))| {
            (0..n)
                .map(|i| ((i * 13 + s * 7 + 2) % t.vocab) as u32)
                .collect()
        })
        .collect();
    let c = cache(&model);
    let mut b = PackedBatch::default();
    let mut next_block = 0u32;
    for (s, (&(a, _), toks)) in plan.iter().zip(&seqs).enumerate() {
        let nb = toks.len().div_ceil(4) as u32;
        let table = (next_block..next_block + nb).collect();
        next_block += nb;
        b.push_with_adapter(
            s as u64,
            toks,
            0,
            table,
            LogitsWanted::All,
            a.map(|i| ids[i]),
        );
    }
    reg.ensure_resident(&ids).unwrap();
    let rows = model
        .forward_with_lora(&b, &c, Some(&reg))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut it = rows.into_iter();
    for (s, (&(a, _), toks)) in plan.iter().zip(&seqs).enumerate() {
        let got: Vec<Vec<f32>> = it.by_ref().take(toks.len()).collect();
        let want = match a {
            Some(i) => alone(&merged(dir.path(), &map, &ads[i]), toks),
            None => alone(&model, toks),
        };
        let e = rel_err(&got, &want);
        assert!(e <= 1e-5, "sequence {s} (adapter {a:?}): max rel err {e}");
        if a.is_some() {
            assert!(
                rel_err(&alone(&model, toks), &want) > 1e-3,
                "adapter {a:?} should change the logits"
            );
        }
    }
}

#[test]
fn saved_adapter_reloads_bit_identically() {
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 32);
    let (model, _) = base(dir.path());
    let a = random_adapter(&t.model_config(), 8, 16.0, &Proj::ALL, true, 5);
    a.save(&dir.path().join("a")).unwrap();
    let b = LoraAdapter::load(&dir.path().join("a"), &model.cfg, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(a.config, b.config);
    assert_eq!(
        a.weights.keys().collect::<Vec<_>>(),
        b.weights.keys().collect::<Vec<_>>()
    );
    for (k, w) in &a.weights {
        let v = &b.weights[k];
        assert_eq!(w.a.to_vec2::<f32>().unwrap(), v.a.to_vec2::<f32>().unwrap());
        assert_eq!(w.b.to_vec2::<f32>().unwrap(), v.b.to_vec2::<f32>().unwrap());
        assert_eq!(w.scale, v.scale);
    }
    b.save(&dir.path().join("b")).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert_eq!(
            std::fs::read(dir.path().join("a").join(f)).unwrap(),
            std::fs::read(dir.path().join("b").join(f)).unwrap(),
            "{f}"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("a/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    let keys = candle_core::safetensors::load(
        dir.path().join("a/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(keys.contains_key("base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"));
}

#[test]
fn registry_evicts_only_idle_adapters_lru_and_reloads_on_demand() {
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 33);
    let (model, _) = base(dir.path());
    let mut reg = AdapterRegistry::new(
        RegistryConfig {
            max_loras: 2,
            max_lora_rank: 16,
        },
        &model.cfg,
        &Device::Cpu,
        DType::F32,
    );
    let mut ids = vec![];
    for i in 0..3 {
        let p = dir.path().join(format!("a{i}"));
        random_adapter(&t.model_config(), 4, 8.0, &[Proj::Q], false, 10 + i)
            .save(&p)
            .unwrap();
        ids.push(reg.register(&format!("a{i}"), &p).unwrap());
    }
    assert_eq!(reg.resident(), vec!["a0", "a1"]);
    assert_eq!(reg.slot(ids[2]), None);
    reg.ensure_resident(&[ids[1]]).unwrap(); // a1 is now more recent than a0
    reg.ensure_resident(&[ids[2]]).unwrap();
    assert_eq!(reg.slot(ids[0]), None, "a0 was the least recently used");
    assert!(reg.slot(ids[1]).is_some() && reg.slot(ids[2]).is_some());
    // Pinned adapters stay, even when least recently used.
    reg.pin(ids[1]);
    reg.pin(ids[2]);
    let err = reg.ensure_resident(&[ids[0]]).unwrap_err().to_string();
    assert!(err.contains("slots are in use"), "{err}");
    let err = reg.unregister("a1").unwrap_err().to_string();
    assert!(err.contains("in use"), "{err}");
    reg.unpin(ids[1]);
    reg.ensure_resident(&[ids[0]]).unwrap();
    assert_eq!(reg.slot(ids[1]), None);
    assert!(reg.slot(ids[2]).is_some());
    assert_eq!(reg.evictions, 2);
    // Above the server's max rank: refused with the module named.
    let p = dir.path().join("big");
    random_adapter(&t.model_config(), 32, 8.0, &[Proj::V], false, 20)
        .save(&p)
        .unwrap();
    let err = reg.register("big", &p).unwrap_err().to_string();
    assert!(
        err.contains("v_proj") && err.contains("rank 32") && err.contains("16"),
        "{err}"
    );
    let err = reg
        .register("a0", &dir.path().join("a0"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("already loaded"), "{err}");
}

fn load_err(dir: &Path, t: &Tiny) -> String {
    let cfg = tandem_model::ModelConfig::from_hf_value(&t.config_json(), Path::new("config.json"))
        .unwrap();
    LoraAdapter::load(dir, &cfg, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string()
}

#[test]
fn broken_adapters_give_clear_errors() {
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a");
    let good = random_adapter(&t.model_config(), 4, 8.0, &[Proj::Q, Proj::Down], false, 6);
    let edit_cfg = |f: &dyn Fn(&mut serde_json::Value)| {
        good.save(&p).unwrap();
        let path = p.join("adapter_config.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
    };
    edit_cfg(&|v| v["peft_type"] = "IA3".into());
    let e = load_err(&p, &t);
    assert!(
        e.contains("adapter_config.json") && e.contains("peft_type") && e.contains("IA3"),
        "{e}"
    );
    edit_cfg(&|v| v["target_modules"] = serde_json::json!(["q_proj", "lm_head"]));
    let e = load_err(&p, &t);
    assert!(e.contains("target_modules") && e.contains("lm_head"), "{e}");
    edit_cfg(&|v| v["bias"] = "all".into());
    assert!(load_err(&p, &t).contains("bias"));
    // Newer PEFT options that add weights beyond A and B are refused by name.
    for (key, value) in [
        ("use_dora", serde_json::json!(true)),
        ("lora_bias", serde_json::json!(true)),
        ("layer_replication", serde_json::json!([[0, 2]])),
        ("trainable_token_indices", serde_json::json!([5, 6])),
        (
            "target_parameters",
            serde_json::json!(["experts.gate_up_proj"]),
        ),
    ] {
        edit_cfg(&|v| v[key] = value.clone());
        let e = load_err(&p, &t);
        assert!(e.contains(key) && e.contains("not supported"), "{e}");
    }
    // Their defaults (false, null, empty) load.
    edit_cfg(&|v| {
        v["lora_bias"] = false.into();
        v["layer_replication"] = serde_json::Value::Null;
        v["target_parameters"] = serde_json::json!([]);
    });
    LoraAdapter::load(&p, &t.model_config(), &Device::Cpu, DType::F32).unwrap();

    let st = p.join("adapter_model.safetensors");
    let edit_tensors = |f: &dyn Fn(&mut HashMap<String, Tensor>)| {
        good.save(&p).unwrap();
        let mut m = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
        f(&mut m);
        candle_core::safetensors::save(&m, &st).unwrap();
    };
    let key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
    edit_tensors(&|m| {
        m.remove("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight");
    });
    let e = load_err(&p, &t);
    assert!(
        e.contains("layers.1.mlp.down_proj.lora_B.weight") && e.contains("missing"),
        "{e}"
    );
    edit_tensors(&|m| {
        m.insert(
            key.into(),
            Tensor::zeros((4, 7), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(&p, &t);
    assert!(e.contains(key) && e.contains("[4, 7]"), "{e}");
    edit_tensors(&|m| {
        let bad = Tensor::new(&[[f32::NAN; 64]; 4], &Device::Cpu).unwrap();
        m.insert(key.into(), bad);
    });
    let e = load_err(&p, &t);
    assert!(e.contains(key) && e.contains("NaN"), "{e}");
    edit_tensors(&|m| {
        m.insert(
            "base_model.model.model.layers.0.mlp.act_fn.lora_A.weight".into(),
            Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(&p, &t);
    assert!(e.contains("act_fn") && e.contains("unknown module"), "{e}");
    edit_tensors(&|m| {
        m.insert(
            "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight".into(),
            Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(&p, &t);
    assert!(e.contains("layer 9 does not exist"), "{e}");
    std::fs::remove_file(&st).unwrap();
    let e = load_err(&p, &t);
    assert!(e.contains("adapter_model.safetensors"), "{e}");
}
