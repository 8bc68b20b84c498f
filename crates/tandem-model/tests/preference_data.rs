//! Preference data for DPO: OpenAI's format and TRL's (explicit prompt as messages or text,
//! implicit prompt) tokenize to the same pairs — a shared prompt as context, each answer the
//! target — and bad lines give errors naming the field; a file holds one kind of line.

use tandem_model::finetune::{
    parse_preference, preference_pairs, tokenize_pair, validate_file, FileKind,
};

mod common;
use common::{tokenizer, words};

fn openai_line() -> String {
    serde_json::json!({"input": {"messages": [{"role": "user", "content": "how are you"}]},
        "preferred_output": [{"role": "assistant", "content": "fine thanks"}],
        "non_preferred_output": [{"role": "assistant", "content": "hi"}]})
    .to_string()
}

#[test]
fn openai_and_trl_lines_give_the_same_pair() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let user = serde_json::json!([{"role": "user", "content": "how are you"}]);
    let lines = [
        openai_line(),
        serde_json::json!({"prompt": user, "chosen": [{"role": "assistant", "content": "fine thanks"}],
            "rejected": [{"role": "assistant", "content": "hi"}]})
        .to_string(),
        serde_json::json!({"chosen": [user[0], {"role": "assistant", "content": "fine thanks"}],
            "rejected": [user[0], {"role": "assistant", "content": "hi"}]})
        .to_string(),
    ];
    let pairs: Vec<_> = lines
        .iter()
        .map(|l| tokenize_pair(&parse_preference(l).unwrap(), &tok, 64).unwrap())
        .collect();
    assert_eq!(pairs[0], pairs[1]);
    assert_eq!(pairs[0], pairs[2]);
    let p = &pairs[0];
    let shown = |e: &tandem_model::finetune::Example| {
        words(&tok, &e.tokens)
            .into_iter()
            .zip(&e.target)
            .filter(|(_, t)| **t)
            .map(|(w, _)| w)
            .collect::<Vec<_>>()
    };
    // Targets: the answer and the turn's end, not the prompt.
    assert_eq!(shown(&p.chosen), ["fine", "thanks", "</", "end", ">"]);
    assert_eq!(shown(&p.rejected), ["hi", "</", "end", ">"]);
    let n = p.chosen.tokens.len() - 5;
    assert_eq!(
        p.chosen.tokens[..n],
        p.rejected.tokens[..n],
        "shared prompt"
    );
    // TRL's text format: a completion pair.
    let text = serde_json::json!({"prompt": "how are you", "chosen": " fine", "rejected": " hi"})
        .to_string();
    let t = tokenize_pair(&parse_preference(&text).unwrap(), &tok, 64).unwrap();
    assert_eq!(shown(&t.chosen), ["fine", "end"]);
    assert_eq!(
        words(&tok, &t.rejected.tokens),
        ["how", "are", "you", "hi", "end"]
    );
}

#[test]
fn bad_lines_name_the_field() {
    let m = |role: &str, content: &str| serde_json::json!([{"role": role, "content": content}]);
    let input = serde_json::json!({"messages": m("user", "hi")});
    let cases = [
        (
            serde_json::json!({"input": input, "preferred_output": m("assistant", "a")}),
            "non_preferred_output",
        ),
        (
            serde_json::json!({"input": input, "preferred_output": m("user", "a"), "non_preferred_output": m("assistant", "b")}),
            "preferred_output[0].role",
        ),
        (
            serde_json::json!({"input": input, "preferred_output": [], "non_preferred_output": []}),
            "preferred_output",
        ),
        (
            serde_json::json!({"input": input, "preferred_output": m("assistant", ""), "non_preferred_output": m("assistant", "b")}),
            "preferred_output[0].content",
        ),
        (
            serde_json::json!({"input": input, "preferred_output": m("assistant", "a"), "non_preferred_output": m("assistant", "a")}),
            "non_preferred_output",
        ),
        (
            serde_json::json!({"preferred_output": m("assistant", "a"), "non_preferred_output": m("assistant", "b")}),
            "input",
        ),
        (
            serde_json::json!({"input": {"messages": []}, "preferred_output": m("assistant", "a"), "non_preferred_output": m("assistant", "b")}),
            "input.messages",
        ),
        (
            serde_json::json!({"chosen": m("assistant", "a")}),
            "rejected",
        ),
        (
            serde_json::json!({"chosen": m("assistant", "a"), "rejected": m("assistant", "b")}),
            "prompt",
        ),
        (
            serde_json::json!({"prompt": "q", "chosen": "a", "rejected": 3}),
            "rejected",
        ),
    ];
    for (line, field) in cases {
        let (f, msg) = parse_preference(&line.to_string()).unwrap_err();
        assert_eq!(f, field, "{line}: {msg}");
    }
}

#[test]
fn a_file_holds_one_kind_of_line() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let sup = r#"{"prompt": "hi", "completion": " there"}"#;
    let two = format!("{}\n\n{}\n", openai_line(), openai_line());
    assert_eq!(validate_file(&two), Ok((FileKind::Preference, 2)));
    assert_eq!(
        validate_file(&format!("{sup}\n{sup}\n")),
        Ok((FileKind::Supervised, 2))
    );
    let mixed = validate_file(&format!("{sup}\n{}\n", openai_line())).unwrap_err();
    assert!(mixed.starts_with("line 2: a preference line"), "{mixed}");
    let bad = validate_file(&format!(
        "{}\n{{\"input\": {{}}, \"preferred_output\": []}}\n",
        openai_line()
    ))
    .unwrap_err();
    assert!(bad.starts_with("line 2: `input.messages`"), "{bad}");
    assert_eq!(preference_pairs(&two, &tok, 64).unwrap().len(), 2);
    // Each parser says when a line is of the other kind.
    let (f, msg) = parse_preference(sup).unwrap_err();
    assert!(f == "json" && msg.contains("supervised example"), "{msg}");
    let (f, msg) = tandem_model::finetune::parse_record(&openai_line()).unwrap_err();
    assert!(f == "json" && msg.contains("dpo method"), "{msg}");
    let (line, field, _) = preference_pairs("\n", &tok, 64).unwrap_err();
    assert_eq!((line, field.as_str()), (0, "lines"));
}
