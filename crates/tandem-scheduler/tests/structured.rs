//! Constrained decoding through the engine, on tiny random models (a random model makes random
//! choices, so every branch of a schema gets taken): every output parses and validates against
//! its schema (checked by the `jsonschema` crate), greedy and sampled, under preemption; a
//! constrained request gives the same tokens alone and batched with unconstrained ones;
//! regex, choice and Lark / GBNF grammars match; byte-level and SentencePiece vocabularies.

use candle_core::{DType, Device};
use serde_json::{json, Value};
use tandem_model::grammar::{Constraint, GrammarCompiler};
use tandem_model::testing::{
    gpt2_tokenizer_meta, spm_tokenizer_meta, write_gguf_with_tokenizer, Tiny,
};
use tandem_model::{load_model, ModelRunner, SamplingParams, TextTokenizer};
use tandem_scheduler::{FinishReason, LlmEngine, SchedulerConfig};

mod common;
use common::run_all;

struct Setup {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    tokenizer: TextTokenizer,
    compiler: GrammarCompiler,
}

fn setup(spm: bool) -> Setup {
    // Room for the tokenizers' vocabularies (263 and about 300 tokens).
    let t = Tiny {
        vocab: 320,
        ..Tiny::gqa()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let meta = if spm {
        spm_tokenizer_meta()
    } else {
        gpt2_tokenizer_meta()
    };
    write_gguf_with_tokenizer(&t, &t.weights(5), &path, meta);
    let m = load_model(Some(&path), &Device::Cpu, DType::F32).unwrap();
    let compiler = GrammarCompiler::new(m.tokenizer.clone(), m.model.cfg.vocab_size);
    Setup {
        tokenizer: m.tokenizer,
        _dir: dir,
        path,
        compiler,
    }
}

fn engine(s: &Setup, num_blocks: usize, max_num_seqs: usize, budget: usize) -> LlmEngine {
    let m = load_model(Some(&s.path), &Device::Cpu, DType::F32).unwrap();
    let runner = ModelRunner::new(m.model, num_blocks, 4).unwrap();
    LlmEngine::new(
        runner,
        m.tokenizer,
        SchedulerConfig {
            max_num_seqs,
            max_batched_tokens: budget,
            block_size: 4,
            num_blocks,
            max_model_len: 1024,
            max_loras: 4,
            enable_prefix_caching: true,
        },
    )
}

fn schemas() -> Vec<Value> {
    vec![
        // Nested objects, optional and required fields, integers with bounds, enums.
        json!({"type": "object", "properties": {
            "id": {"type": "integer", "minimum": -5, "maximum": 300},
            "kind": {"enum": ["cat", "dog", 7, null]},
            "owner": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 6},
                "vip": {"type": "boolean"}
            }, "required": ["vip"]}
        }, "required": ["id", "owner"]}),
        // Arrays with min/max items, numbers.
        json!({"type": "object", "properties": {
            "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 10}, "minItems": 2, "maxItems": 4},
            "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}
        }, "required": ["scores", "flags"]}),
        // $defs / $ref and anyOf.
        json!({"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x", "y"]}},
            "type": "object", "properties": {
                "a": {"$ref": "#/$defs/point"},
                "b": {"anyOf": [{"$ref": "#/$defs/point"}, {"type": "string", "enum": ["none", "n/a"]}]}
            }, "required": ["a", "b"]}),
        // A top-level array of constants.
        json!({"type": "array", "items": {"const": "ok"}, "minItems": 1, "maxItems": 3}),
    ]
}

fn constrained(s: &Setup, c: &Constraint, temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        seed: Some(seed),
        max_tokens: 400,
        grammar: Some(s.compiler.compile(c).unwrap()),
        ..Default::default()
    }
}

fn prompt(s: &Setup, text: &str) -> Vec<u32> {
    s.tokenizer.encode(text, false).unwrap()
}

fn check_json(schema: &Value, text: &str, what: &str) {
    let v: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: {text:?} is not JSON: {e}"));
    let validator = jsonschema::validator_for(schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{what}: {text} does not validate: {errors:?}"
    );
}

#[test]
fn every_output_validates_greedy_and_sampled_under_preemption() {
    for spm in [false, true] {
        let s = setup(spm);
        let mut reqs = Vec::new();
        let mut want = Vec::new();
        for (k, schema) in schemas().into_iter().enumerate() {
            let c = Constraint::JsonSchema {
                schema: schema.clone(),
                strict: true,
            };
            for (temperature, seed) in [(0.0, 0), (1.0, 1), (1.0, 2), (1.5, 3)] {
                reqs.push((
                    prompt(&s, &format!("json {k} {seed}")),
                    constrained(&s, &c, temperature, seed),
                ));
                want.push(schema.clone());
            }
        }
        // 40 blocks of 4 tokens for 16 sequences of up to a few hundred tokens: preemption.
        let mut e = engine(&s, 40, 16, 64);
        let out = run_all(&mut e, &reqs);
        for (i, ((_, text, reason), schema)) in out.iter().zip(&want).enumerate() {
            let what = format!("spm {spm}, request {i}");
            assert_eq!(*reason, FinishReason::Stop, "{what}: {text}");
            check_json(schema, text, &what);
        }
        assert!(
            e.scheduler.num_preemptions > 0,
            "the test should exercise preemption"
        );
    }
}

#[test]
fn a_constrained_request_is_the_same_alone_and_in_a_mixed_batch() {
    let s = setup(false);
    let c = Constraint::JsonSchema {
        schema: schemas()[0].clone(),
        strict: false,
    };
    for (temperature, seed) in [(0.0, 0), (1.0, 9)] {
        let req = (
            prompt(&s, "the pet"),
            constrained(&s, &c, temperature, seed),
        );
        let alone = run_all(&mut engine(&s, 256, 8, 512), std::slice::from_ref(&req)).remove(0);
        let free = |seed| SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            max_tokens: 30,
            ignore_eos: true,
            ..Default::default()
        };
        let mixed = run_all(
            &mut engine(&s, 256, 8, 512),
            &[
                (prompt(&s, "hello there"), free(1)),
                req.clone(),
                (prompt(&s, "in the"), free(2)),
            ],
        );
        assert_eq!(alone.0, mixed[1].0, "temperature {temperature}");
        assert_eq!(mixed[0].0.len(), 30);
        check_json(&schemas()[0], &alone.1, "alone");
    }
}

/// Whether an output is what its constraint allows.
type Check = Box<dyn Fn(&str) -> bool>;

#[test]
fn regex_choice_and_grammars_match() {
    let s = setup(false);
    let re = regex::Regex::new(r"^(\d{3}-[a-f]{2,4}|none)$").unwrap();
    let cases: Vec<(Constraint, Check)> = vec![
        (Constraint::Regex(r"(\d{3}-[a-f]{2,4}|none)".into()), Box::new(move |t: &str| re.is_match(t))),
        (
            Constraint::Choice(vec!["left".into(), "right\n".into(), "up \"quoted\"".into()]),
            Box::new(|t: &str| ["left", "right\n", "up \"quoted\""].contains(&t)),
        ),
        (
            Constraint::Grammar("start: item (\",\" item)*\nitem: \"x\" | NUM\nNUM: /[0-9]{1,2}/\n%ignore \" \"".replace("%ignore \" \"", "")),
            Box::new(|t: &str| t.split(',').all(|i| i == "x" || (i.len() <= 2 && !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit())))),
        ),
        (
            Constraint::Grammar("root ::= greeting \" \" name\ngreeting ::= \"hi\" | \"hello\"\nname ::= [A-Z] [a-z]{1,3}\n".into()),
            Box::new(|t: &str| {
                let (g, n) = t.split_once(' ').unwrap_or(("", ""));
                ["hi", "hello"].contains(&g) && (2..=4).contains(&n.len()) && n.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && n.chars().skip(1).all(|c| c.is_ascii_lowercase())
            }),
        ),
    ];
    for (c, ok) in &cases {
        let reqs: Vec<_> = (0..6)
            .map(|seed| {
                (
                    prompt(&s, &format!("go {seed}")),
                    constrained(&s, c, if seed == 0 { 0.0 } else { 1.2 }, seed),
                )
            })
            .collect();
        for (toks, text, reason) in run_all(&mut engine(&s, 256, 8, 512), &reqs) {
            assert!(ok(&text), "{c:?}: {text:?}");
            assert!(
                reason == FinishReason::Stop || toks.len() == 400,
                "{c:?}: {text:?} {reason:?}"
            );
        }
    }
}

#[test]
fn bad_constraints_say_what_is_wrong() {
    let s = setup(false);
    for (c, needle) in [
        (Constraint::Regex("(a".into()), "regex"),
        (Constraint::Choice(vec![]), "at least one"),
        (
            Constraint::Grammar("start: missing_rule".into()),
            "missing_rule",
        ),
        (
            Constraint::Grammar("root ::= \"open".into()),
            "unterminated",
        ),
        (
            Constraint::JsonSchema {
                schema: json!({"type": "integer", "minimum": 5, "maximum": 1}),
                strict: true,
            },
            "nsatisfiable",
        ),
        (
            Constraint::JsonSchema {
                schema: json!("not a schema"),
                strict: false,
            },
            "object",
        ),
    ] {
        let err = s.compiler.compile(&c).map(|_| ()).unwrap_err();
        assert!(err.contains(needle), "{c:?}: {err}");
    }
}

#[test]
fn a_grammar_that_cannot_finish_in_max_tokens_ends_by_length() {
    let s = setup(false);
    let c = Constraint::Regex("[a-z]{50}".into());
    let mut p = constrained(&s, &c, 0.0, 0);
    p.max_tokens = 5;
    let (toks, text, reason) =
        run_all(&mut engine(&s, 64, 2, 64), &[(prompt(&s, "abc"), p)]).remove(0);
    assert_eq!((reason, toks.len()), (FinishReason::Length, 5));
    assert!(
        !text.is_empty() && text.bytes().all(|b| b.is_ascii_lowercase()),
        "{text:?}"
    );
}
