//! Training data: the three JSONL shapes, loss masks (completion only; assistant turns only
//! through the chat template), and errors that name the line and the field.

use tandem_model::finetune::{load_jsonl, parse_record, tokenize, validate_jsonl, Record};

mod common;
use common::{tokenizer, words};

#[test]
fn loss_masks_follow_the_record_shape() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let file = dir.path().join("train.jsonl");
    std::fs::write(
        &file,
        [
            r#"{"prompt": "q how are you", "completion": "fine thanks"}"#,
            "",
            r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]}"#,
            r#"{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi", "weight": 0}, {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]}"#,
            r#"{"text": "text only"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let ex = load_jsonl(&file, &tok, 1024).unwrap();
    assert_eq!(ex.len(), 4);
    let targets = |i: usize| -> Vec<String> {
        let w = words(&tok, &ex[i].tokens);
        w.into_iter()
            .zip(&ex[i].target)
            .filter(|(_, t)| **t)
            .map(|(w, _)| w)
            .collect()
    };
    // Completion and the EOS after it.
    assert_eq!(
        words(&tok, &ex[0].tokens),
        ["q", "how", "are", "you", "fine", "thanks", "end"]
    );
    assert_eq!(targets(0), ["fine", "thanks", "end"]);
    // Both assistant turns, with the template's end-of-turn marker; nothing else.
    assert_eq!(
        targets(1),
        ["hi", "there", "</", "end", ">", "fine", "</", "end", ">"]
    );
    // weight 0: the first answer is context only.
    assert_eq!(targets(2), ["fine", "</", "end", ">"]);
    // text: every token but the first, then EOS.
    assert_eq!(targets(3), ["only", "end"]);
    assert!(!ex.iter().any(|e| e.target[0]));
    // Cut to max_seq_len; a line left with nothing to learn is an error naming it.
    let short = load_jsonl(&file, &tok, 6).unwrap_err().to_string();
    assert!(
        short.contains("train.jsonl") && short.contains("line 3"),
        "{short}"
    );
}

#[test]
fn sharegpt_trl_and_alpaca_lines_read_as_the_same_chat() {
    let same = [
        (
            r#"{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi there"}, {"from": "human", "value": "how are you"}, {"from": "gpt", "value": "fine", "weight": 0}]}"#,
            r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine", "weight": 0}]}"#,
        ),
        (
            r#"{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}], "completion": [{"role": "assistant", "content": "hi there"}]}"#,
            r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]}"#,
        ),
        (
            r#"{"instruction": "hello", "input": "", "output": "hi there"}"#,
            r#"{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]}"#,
        ),
        (
            r#"{"instruction": "translate", "input": "bonjour", "output": "hello", "system": "be brief"}"#,
            r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "translate\n\nbonjour"}, {"role": "assistant", "content": "hello"}]}"#,
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    for (other, openai) in same {
        let (a, b) = (parse_record(other).unwrap(), parse_record(openai).unwrap());
        assert_eq!(a, b, "{other}");
        // A prompt message is context even if it is an assistant's.
        assert_eq!(
            tokenize(&a, &tok, 1024).unwrap(),
            tokenize(&b, &tok, 1024).unwrap()
        );
    }
    let Record::Chat(m, _) = parse_record(
        r#"{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "completion": [{"role": "assistant", "content": "c"}]}"#,
    )
    .unwrap() else {
        panic!("not chat")
    };
    assert_eq!(
        m.iter().map(|(_, t)| *t).collect::<Vec<_>>(),
        [false, false, true]
    );
}

#[test]
fn bad_lines_name_the_line_and_field() {
    let cases = [
        ("not json", "json"),
        ("[1, 2]", "json"),
        (r#"{"prompt": "a"}"#, "completion"),
        (r#"{"prompt": "a", "completion": 5}"#, "completion"),
        (r#"{"prompt": "a", "completion": ""}"#, "completion"),
        (r#"{"messages": "hi"}"#, "messages"),
        (
            r#"{"messages": [{"role": "user", "content": "x"}]}"#,
            "messages",
        ),
        (
            r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
            "messages[0].role",
        ),
        (
            r#"{"messages": [{"role": "assistant"}]}"#,
            "messages[0].content",
        ),
        (
            r#"{"messages": [{"role": "assistant", "content": "x", "weight": 2}]}"#,
            "messages[0].weight",
        ),
        (r#"{"text": ""}"#, "text"),
        (r#"{"input": "x"}"#, "json"),
        (
            r#"{"conversations": [{"from": "alien", "value": "x"}]}"#,
            "conversations[0].from",
        ),
        (
            r#"{"conversations": [{"from": "human"}]}"#,
            "conversations[0].value",
        ),
        (r#"{"conversations": {}}"#, "conversations"),
        (r#"{"instruction": "x"}"#, "output"),
        (r#"{"instruction": "x", "output": 3}"#, "output"),
        (
            r#"{"prompt": [{"role": "user", "content": "x"}], "completion": "y"}"#,
            "completion",
        ),
        (
            r#"{"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "user", "content": "y"}]}"#,
            "messages",
        ),
    ];
    for (line, field) in cases {
        let (f, msg) = parse_record(line).unwrap_err();
        assert_eq!(f, field, "{line}: {msg}");
        let err = validate_jsonl(&format!("{{\"text\": \"ok\"}}\n{line}\n")).unwrap_err();
        assert!(err.starts_with("line 2: `"), "{err}");
    }
    assert_eq!(
        validate_jsonl("{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n"),
        Ok(2)
    );
    assert!(validate_jsonl("\n").is_err());
    assert!(matches!(
        parse_record(r#"{"completion": "just this"}"#),
        Ok(Record::Completion { .. })
    ));
}

#[test]
fn tool_call_examples_learn_the_calls_as_serving_renders_them() {
    use tandem_model::testing::{gpt2_tokenizer_meta, write_gguf_with_tokenizer, Tiny};
    let t = Tiny {
        vocab: 320,
        ..Tiny::gqa()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    write_gguf_with_tokenizer(&t, &t.weights(1), &path, gpt2_tokenizer_meta());
    let tok = tandem_model::load_model(
        Some(&path),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap()
    .tokenizer;
    let line = r#"{"messages": [{"role": "user", "content": "weather in Paris?"}, {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}, {"role": "tool", "tool_call_id": "call_1", "content": "18C"}, {"role": "assistant", "content": "It is 18C."}], "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]}"#;
    let rec = parse_record(line).unwrap();
    let Record::Chat(msgs, tools) = &rec else {
        panic!("not chat")
    };
    assert_eq!(tools.len(), 1);
    let ex = tokenize(&rec, &tok, 4096).unwrap();
    let targets: Vec<u32> = ex
        .tokens
        .iter()
        .zip(&ex.target)
        .filter(|(_, &t)| t)
        .map(|(&x, _)| x)
        .collect();
    assert_eq!(
        tok.decode(&targets, false).unwrap(),
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\nIt is 18C.<|im_end|>\n"
    );
    // The context before the first call is the prompt serving builds for the first turn.
    let all: Vec<_> = msgs.iter().map(|(m, _)| m.clone()).collect();
    let prompt = tok
        .apply_chat_template_with_tools(&all[..1], tools, true)
        .unwrap();
    assert!(prompt.contains("<tools>") && prompt.contains("get_weather"));
    let prompt_ids = tok.encode(&prompt, false).unwrap();
    assert_eq!(&ex.tokens[..prompt_ids.len()], &prompt_ids[..]);
    assert!(!ex.target[..prompt_ids.len()].iter().any(|&t| t));
}

#[test]
fn bad_tool_call_lines_name_the_field() {
    let cases = [
        (
            r#"{"messages": [{"role": "user", "content": "x", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "assistant", "content": "y"}]}"#,
            "messages[0].tool_calls",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}"#,
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}]}"#,
            "messages[1].tool_calls[0].function.name",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": [{"type": "function"}]}"#,
            "tools[0]",
        ),
    ];
    for (line, field) in cases {
        let (f, m) = parse_record(line).unwrap_err();
        assert_eq!(f, field, "{line}: {m}");
    }
}
