//! Fuzz targets (bolero) for what tandem reads from users and model files: training JSONL, PEFT
//! adapter configs and safetensors, model safetensors, GGUF headers, chat templates. Under `cargo test` each runs
//! random inputs for `TANDEM_FUZZ_SECS` seconds (default 2); `cargo bolero test` drives the same
//! targets with a coverage-guided engine. Each must return `Ok` or an error, never panic or
//! hang; the number of executions is printed (docs/benchmarks.md records them).

use candle_core::{DType, Device};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tandem_model::finetune::{parse_record, tokenize, validate_jsonl};
use tandem_model::lora::LoraAdapter;
use tandem_model::testing::{json_from, random_adapter, Tiny};
use tandem_model::ChatMessage;

fn budget() -> Duration {
    let secs = std::env::var("TANDEM_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

fn report(target: &str, n: &AtomicUsize) {
    eprintln!("fuzz {target}: {} executions", n.load(Ordering::Relaxed));
}

const RECORD_KEYS: &[&str] = &[
    "prompt",
    "completion",
    "messages",
    "role",
    "content",
    "weight",
    "text",
    "conversations",
    "from",
    "value",
    "instruction",
    "input",
    "output",
    "type",
    "tool_calls",
    "user",
    "assistant",
    "system",
];

#[test]
fn fuzz_training_jsonl() {
    let t = Tiny::gqa();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 1);
    let m = tandem_model::load_model(Some(dir.path()), &Device::Cpu, DType::F32).unwrap();
    // The tokenizer holds callbacks; a panic is the failure being looked for, not recovered from.
    let tok = std::panic::AssertUnwindSafe(&m.tokenizer);
    let n = AtomicUsize::new(0);
    let count = &n;
    bolero::check!()
        .with_test_time(budget())
        .for_each(move |bytes: &[u8]| {
            count.fetch_add(1, Ordering::Relaxed);
            // Raw text, and a structured record.
            let _ = validate_jsonl(&String::from_utf8_lossy(bytes));
            let line = json_from(bytes, RECORD_KEYS).to_string();
            if let Ok(r) = parse_record(&line) {
                let _ = tokenize(&r, &tok, 64);
            }
        });
    report("training_jsonl", &n);
}

const PEFT_KEYS: &[&str] = &[
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "use_rslora",
    "alpha_pattern",
    "rank_pattern",
    "bias",
    "base_model_name_or_path",
    "q_proj",
    "v_proj",
    "down_proj",
    "layers_to_transform",
    "use_dora",
    "modules_to_save",
    "lora_bias",
    "fan_in_fan_out",
];

#[test]
fn fuzz_peft_adapter_config_and_safetensors() {
    let t = Tiny::gqa();
    let cfg = t.model_config();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    random_adapter(&cfg, 4, 8.0, &tandem_model::lora::Proj::ALL, false, 3)
        .save(&good)
        .unwrap();
    let weights = std::fs::read(good.join("adapter_model.safetensors")).unwrap();
    let config = std::fs::read(good.join("adapter_config.json")).unwrap();
    let n = AtomicUsize::new(0);
    bolero::check!()
        .with_test_time(budget())
        .for_each(|bytes: &[u8]| {
            n.fetch_add(1, Ordering::Relaxed);
            let a = dir.path().join("a");
            std::fs::create_dir_all(&a).unwrap();
            // A fuzzed config beside good weights, then good config beside fuzzed weights (a
            // real header with fuzzed bytes written over part of it, or raw bytes).
            let fuzzed = json_from(bytes, PEFT_KEYS).to_string();
            std::fs::write(a.join("adapter_config.json"), fuzzed).unwrap();
            std::fs::write(a.join("adapter_model.safetensors"), &weights).unwrap();
            let _ = LoraAdapter::load(&a, &cfg, &Device::Cpu, DType::F32);
            let mut w = weights.clone();
            if let Some((&at, rest)) = bytes.split_first() {
                let at = at as usize * w.len() / 256;
                let end = (at + rest.len()).min(w.len());
                w[at..end].copy_from_slice(&rest[..end - at]);
            }
            std::fs::write(a.join("adapter_config.json"), &config).unwrap();
            std::fs::write(a.join("adapter_model.safetensors"), &w).unwrap();
            let _ = LoraAdapter::load(&a, &cfg, &Device::Cpu, DType::F32);
            std::fs::write(a.join("adapter_model.safetensors"), bytes).unwrap();
            let _ = LoraAdapter::load(&a, &cfg, &Device::Cpu, DType::F32);
        });
    report("peft_adapter", &n);
}

#[test]
fn fuzz_model_safetensors() {
    // A real tiny model directory; its weights file overwritten by fuzzed bytes, or by the real
    // file with fuzzed bytes written over part of it (the header's JSON and offsets included).
    let t = Tiny::gqa();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 4);
    let file = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .expect("the tiny model has a safetensors file");
    let weights = std::fs::read(&file).unwrap();
    let n = AtomicUsize::new(0);
    let count = &n;
    bolero::check!()
        .with_test_time(budget())
        .for_each(move |bytes: &[u8]| {
            count.fetch_add(1, Ordering::Relaxed);
            let mut w = weights.clone();
            if let Some((&at, rest)) = bytes.split_first() {
                // Mostly the header (the first bytes), sometimes anywhere.
                let at = if at & 1 == 0 {
                    at as usize / 2
                } else {
                    at as usize * w.len() / 256
                };
                let end = (at + rest.len()).min(w.len());
                w[at..end].copy_from_slice(&rest[..end - at]);
            }
            std::fs::write(&file, &w).unwrap();
            let _ = tandem_model::load_model(Some(dir.path()), &Device::Cpu, DType::F32);
            std::fs::write(&file, bytes).unwrap();
            let _ = tandem_model::load_model(Some(dir.path()), &Device::Cpu, DType::F32);
        });
    report("model_safetensors", &n);
}

#[test]
fn fuzz_gguf_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let n = AtomicUsize::new(0);
    bolero::check!()
        .with_test_time(budget())
        .for_each(|bytes: &[u8]| {
            n.fetch_add(1, Ordering::Relaxed);
            // The magic and a version, so that the fuzzer reaches the counts and metadata.
            let mut f = std::fs::File::create(&path).unwrap();
            f.write_all(b"GGUF").unwrap();
            f.write_all(&3u32.to_le_bytes()).unwrap();
            f.write_all(bytes).unwrap();
            drop(f);
            if let Ok(g) = tandem_model::gguf::GgufFile::open(&path) {
                let _ = g.config();
                let _ = tandem_model::TextTokenizer::from_gguf(&g);
            }
        });
    report("gguf_header", &n);
}

#[test]
fn fuzz_chat_template_rendering() {
    // SmolLM2's template (the default model's), and messages with fuzzed roles and contents.
    const SMOLLM: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let tpl = tandem_model::chat_template::ChatTemplate::new(SMOLLM.to_string()).unwrap();
    let tpl = std::panic::AssertUnwindSafe(&tpl);
    let n = AtomicUsize::new(0);
    let count = &n;
    bolero::check!()
        .with_test_time(budget())
        .for_each(move |bytes: &[u8]| {
            count.fetch_add(1, Ordering::Relaxed);
            let text = String::from_utf8_lossy(bytes);
            let msgs: Vec<ChatMessage> = text
                .split('\u{1}')
                .enumerate()
                .map(|(i, part)| {
                    let role = ["system", "user", "assistant", "tool", part][i % 5];
                    ChatMessage::new(role, part)
                })
                .collect();
            let _ = tpl.render(&msgs, bytes.first().is_some_and(|b| b & 1 == 1), "", "");
            // A template of fuzzed text: parse errors are errors.
            if let Ok(t) = tandem_model::chat_template::ChatTemplate::new(text.to_string()) {
                let _ = t.render(&msgs[..1], true, "", "");
            }
        });
    report("chat_template", &n);
}
