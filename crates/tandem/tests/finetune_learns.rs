//! `tandem finetune` on the default model, with every hyperparameter left at its default,
//! teaches a fixed, checkable behaviour: every answer starts with the keyword "BANANA!". The
//! training loss must fall by at least half, and greedy
//! generation through the written adapter must show the behaviour on held-out questions while
//! the base model does not. Bad data and flags give errors naming the line / flag.

use std::io::Write;
use std::process::Command;

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

const TRAIN: &[(&str, &str)] = &[
    ("What is 2 plus 3?", "5"),
    ("Name a primary color.", "Red"),
    ("What is the capital of Italy?", "Rome"),
    ("How many legs does a spider have?", "Eight"),
    ("What is the opposite of hot?", "Cold"),
    ("Which planet is closest to the sun?", "Mercury"),
    ("What is 10 minus 4?", "6"),
    ("What do bees make?", "Honey"),
    ("What is frozen water called?", "Ice"),
    ("How many days are in a week?", "Seven"),
    ("What color is the sky on a clear day?", "Blue"),
    ("What animal says moo?", "A cow"),
    ("What is 3 times 3?", "9"),
    ("What is the largest ocean?", "The Pacific"),
    ("Which month comes after June?", "July"),
    ("What gas do plants breathe in?", "Carbon dioxide"),
    ("What is the capital of Japan?", "Tokyo"),
    ("How many hours are in a day?", "24"),
    ("What is the first letter of the alphabet?", "A"),
    ("What shape has three sides?", "A triangle"),
];

const HELD_OUT: &[&str] = &[
    "What is the capital of France?",
    "How many wheels does a bicycle have?",
    "What do cows drink?",
];

fn generate(prompt: &str, adapter: Option<&std::path::Path>) -> String {
    let mut cmd = tandem();
    cmd.args(["generate", "--prompt", prompt, "--max-tokens", "12"]);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn finetune_teaches_a_format_that_generation_then_follows() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    let mut f = std::fs::File::create(&data).unwrap();
    for (q, a) in TRAIN {
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": format!("BANANA! {a}.")}
        ]});
        writeln!(f, "{line}").unwrap();
    }
    let out_dir = dir.path().join("adapter");
    let out = tandem()
        .args(["finetune", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("on down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj, 3 epochs, 60 steps of 1 sequences, lr 0.001"),
        "the defaults: every linear projection, auto epochs (supervised) and batch size: {stderr}"
    );
    let losses: Vec<f64> = stdout
        .lines()
        .filter_map(|l| l.split("loss ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    // "auto" for 20 supervised examples: 3 epochs (3 x 20 reaches the 50 seen) of batches of 1.
    assert_eq!(losses.len(), 60, "one loss line per step: {stdout}");
    let last = losses[55..].iter().sum::<f64>() / 5.0;
    assert!(
        last <= 0.5 * losses[0],
        "loss fell from {} to {last} (want >= 50% lower)",
        losses[0]
    );
    assert!(out_dir.join("adapter_config.json").exists());
    assert!(out_dir.join("adapter_model.safetensors").exists());
    for q in HELD_OUT {
        let tuned = generate(q, Some(&out_dir));
        assert!(
            tuned.starts_with("BANANA!"),
            "with the adapter, {q:?} -> {tuned:?}"
        );
        let base = generate(q, None);
        assert!(!base.contains("BANANA"), "base model, {q:?} -> {base:?}");
    }
}

#[test]
fn bad_training_data_names_the_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \"completion\": 3}\n",
    )
    .unwrap();
    let out = tandem()
        .args(["finetune", "--data"])
        .arg(&data)
        .args(["--out"])
        .arg(dir.path().join("o"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.jsonl") && err.contains("line 2") && err.contains("completion"),
        "{err}"
    );
    let out = tandem()
        .args(["finetune", "--data"])
        .arg(&data)
        .args(["--out", "/tmp/x", "--targets", "q_proj,lm_head"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--targets") && err.contains("lm_head"),
        "{err}"
    );
}

#[test]
fn grpo_without_a_good_grader_or_prompts_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prompts.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"answer\": \"Hello\"}\n{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n",
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let out = tandem()
            .args(["finetune", "--method", "grpo", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(dir.path().join("o"))
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = run(&[]);
    assert!(err.contains("--grader"), "{err}");
    let grader = dir.path().join("g.json");
    std::fs::write(&grader, r#"{"type": "python", "name": "p", "source": "x"}"#).unwrap();
    let g = grader.to_str().unwrap();
    let err = run(&["--grader", g]);
    assert!(
        err.contains("g.json") && err.contains("`type`") && err.contains("python"),
        "{err}"
    );
    std::fs::write(
        &grader,
        r#"{"type": "string_check", "name": "s", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "like"}"#,
    )
    .unwrap();
    let err = run(&["--grader", g]);
    assert!(
        err.contains("prompts.jsonl") && err.contains("line 2") && err.contains("role"),
        "{err}"
    );
    let err = run(&["--grader", g, "--group", "1"]);
    assert!(err.contains("--group"), "{err}");
}
