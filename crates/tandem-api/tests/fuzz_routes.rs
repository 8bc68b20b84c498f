//! Fuzzing every route's request body (bolero) against the real router and engine thread on a
//! tiny random model: structured JSON built from each route's own field names, and raw bytes.
//! Whatever comes in, the answer is a response with OpenAI's error JSON for anything not 200 —
//! never a panic, a hang or a 5xx. Under `cargo test` it runs for `TANDEM_FUZZ_SECS` seconds
//! (default 2); the number of requests sent is printed.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::{DType, Device};
use http_body_util::BodyExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem_api::{app, AppState};
use tandem_model::lora::RegistryConfig;
use tandem_model::testing::Tiny;
use tandem_model::{load_model, ModelRunner};
use tandem_scheduler::{EngineHandle, LlmEngine, SchedulerConfig};
use tower::ServiceExt;

/// A tiny random model with a ChatML-style chat template, written to `dir`.
fn write_model(dir: &std::path::Path) {
    Tiny::gqa().write_hf_dir(dir, 2);
    let template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}";
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({ "chat_template": template }).to_string(),
    )
    .unwrap();
}

fn state(dir: &std::path::Path) -> Arc<AppState> {
    let m = load_model(Some(dir), &Device::Cpu, DType::F32).unwrap();
    let tokenizer = m.tokenizer.clone();
    let vocab_size = m.model.cfg.vocab_size;
    let runner = ModelRunner::with_adapters(m.model, 256, 16, RegistryConfig::default()).unwrap();
    let engine = LlmEngine::new(
        runner,
        m.tokenizer,
        SchedulerConfig {
            max_num_seqs: 8,
            max_batched_tokens: 256,
            block_size: 16,
            num_blocks: 256,
            // A short context bounds every generation the fuzzer asks for.
            max_model_len: 48,
            max_loras: 4,
            enable_prefix_caching: true,
        },
    );
    Arc::new(AppState {
        engine: EngineHandle::spawn(engine).unwrap(),
        grammars: Arc::new(tandem_model::grammar::GrammarCompiler::new(
            tokenizer.clone(),
            vocab_size,
        )),
        tokenizer,
        model_name: "tiny".into(),
        max_model_len: 48,
        vocab_size,
        tenants: tandem_api::tenants::Tenants::new(vec![], None).unwrap(),
        lora_root: Some(std::fs::canonicalize(dir).unwrap()),
        metrics: tandem_api::metrics::Metrics::new(
            "tiny",
            Duration::from_secs(2),
            Duration::from_millis(250),
        )
        .unwrap(),
        max_pending: 64,
        pending: Default::default(),
        adapter_store: None,
        store: tandem_api::store::Store::open(None).unwrap(),
        data_dir: None,
        adapter_dir: None,
        adapter_remote: None,
        cluster: None,
    })
}

/// Routes taking a JSON body, with the fields their handlers read.
const ROUTES: &[(&str, &[&str])] = &[
    (
        "/v1/chat/completions",
        &[
            "model",
            "messages",
            "role",
            "content",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "top_k",
            "n",
            "stop",
            "seed",
            "stream",
            "stream_options",
            "include_usage",
            "logprobs",
            "top_logprobs",
            "logit_bias",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "min_p",
            "min_tokens",
            "stop_token_ids",
            "response_format",
            "type",
            "json_schema",
            "schema",
            "strict",
            "structured_outputs",
            "json",
            "regex",
            "choice",
            "grammar",
            "guided_json",
            "guided_regex",
            "guided_choice",
            "guided_grammar",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "function",
            "name",
            "parameters",
            "tool_calls",
            "tool_call_id",
            "arguments",
            "functions",
            "function_call",
            "cache_salt",
            "ignore_eos",
            "text",
        ],
    ),
    (
        "/v1/completions",
        &[
            "model",
            "prompt",
            "max_tokens",
            "temperature",
            "top_p",
            "n",
            "stop",
            "echo",
            "logprobs",
            "suffix",
            "best_of",
            "stream",
            "seed",
            "logit_bias",
            "min_tokens",
            "stop_token_ids",
            "return_tokens_as_token_ids",
            "cache_salt",
            "response_format",
            "guided_regex",
            "guided_choice",
            "structured_outputs",
        ],
    ),
    (
        "/tokenize",
        &[
            "model",
            "prompt",
            "messages",
            "role",
            "content",
            "add_special_tokens",
            "add_generation_prompt",
        ],
    ),
    ("/detokenize", &["model", "tokens"]),
    ("/v1/load_lora_adapter", &["lora_name", "lora_path"]),
    ("/v1/unload_lora_adapter", &["lora_name"]),
    (
        "/v1/fine_tuning/jobs",
        &[
            "model",
            "training_file",
            "validation_file",
            "suffix",
            "seed",
            "hyperparameters",
            "n_epochs",
            "batch_size",
            "learning_rate_multiplier",
            "method",
            "type",
            "supervised",
            "dpo",
            "beta",
            "reinforcement",
            "lora",
            "r",
            "alpha",
            "target_modules",
            "metadata",
        ],
    ),
];

/// A valid body per route, for the fuzzer to mutate (so that it reaches past validation).
fn template(route: &str) -> serde_json::Value {
    use serde_json::json;
    match route {
        "/v1/chat/completions" => json!({"model": "tiny", "max_tokens": 3,
            "messages": [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3 w4 w5"}]}),
        "/v1/completions" => json!({"model": "tiny", "prompt": "w1 w2 w3", "max_tokens": 3}),
        "/tokenize" => json!({"model": "tiny", "prompt": "w1 w2"}),
        "/detokenize" => json!({"model": "tiny", "tokens": [1, 2, 3]}),
        "/v1/load_lora_adapter" => json!({"lora_name": "a", "lora_path": "adapter"}),
        "/v1/unload_lora_adapter" => json!({"lora_name": "a"}),
        _ => json!({"model": "tiny", "training_file": "file-x"}),
    }
}

/// A fuzzed body for a route (`tandem_model::testing::json_from`), mostly naming the real model so
/// that requests get past it to the rest.
fn json_from(bytes: &[u8], keys: &[&str]) -> serde_json::Value {
    let mut v = tandem_model::testing::json_from(bytes, keys);
    if let serde_json::Value::Object(m) = &mut v {
        if bytes.first().is_some_and(|x| x % 4 != 0) {
            m.insert("model".into(), "tiny".into());
        }
    }
    v
}

#[test]
fn fuzz_every_route_body() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    let st = state(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let secs = std::env::var("TANDEM_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(2.0);
    let (n, ok) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let (count, accepted) = (&n, &ok);
    let (st, rt) = (
        std::panic::AssertUnwindSafe(st),
        std::panic::AssertUnwindSafe(rt),
    );
    bolero::check!()
        .with_test_time(Duration::from_secs_f64(secs))
        .for_each(move |bytes: &[u8]| {
            let (route, keys) = ROUTES[bytes.first().copied().unwrap_or(0) as usize % ROUTES.len()];
            let mode = bytes.get(1).copied().unwrap_or(0) % 8;
            let fuzzed = json_from(bytes.get(2..).unwrap_or_default(), keys);
            let body = match mode {
                0 => bytes.to_vec(),
                // A valid body with fuzzed fields written over it.
                1..=4 => {
                    let mut v = template(route);
                    if let (Some(m), serde_json::Value::Object(f)) = (v.as_object_mut(), fuzzed) {
                        m.extend(f);
                    }
                    v.to_string().into_bytes()
                }
                _ => fuzzed.to_string().into_bytes(),
            };
            count.fetch_add(1, Ordering::Relaxed);
            let req = Request::post(route)
                .header("content-type", "application/json")
                .body(Body::from(body.clone()))
                .unwrap();
            let resp = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(30), app(st.clone()).oneshot(req)).await
            });
            let resp = resp
                .unwrap_or_else(|_| panic!("{route} hung on {}", String::from_utf8_lossy(&body)));
            let resp = resp.unwrap();
            let status = resp.status();
            let bytes_out = rt
                .block_on(async {
                    tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect()).await
                })
                .unwrap_or_else(|_| panic!("{route}: the body never ended"))
                .unwrap()
                .to_bytes();
            assert!(
                !status.is_server_error(),
                "{route} answered {status} to {}: {}",
                String::from_utf8_lossy(&body),
                String::from_utf8_lossy(&bytes_out)
            );
            if status == StatusCode::OK {
                accepted.fetch_add(1, Ordering::Relaxed);
            } else {
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes_out).unwrap_or_else(|_| {
                        panic!(
                            "{route}: {status} without JSON: {}",
                            String::from_utf8_lossy(&bytes_out)
                        )
                    });
                assert!(v["error"]["message"].is_string(), "{route}: {v}");
            }
        });
    eprintln!(
        "fuzz route bodies: {} requests, {} answered 200",
        n.load(Ordering::Relaxed),
        ok.load(Ordering::Relaxed)
    );
}

/// Crashes the fuzzer found, kept as regression tests.
#[test]
fn regressions_found_by_fuzzing() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    let st = state(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let post = |route: &str, body: serde_json::Value| {
        let req = Request::post(route)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        rt.block_on(async {
            let resp = app(st.clone()).oneshot(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            )
        })
    };
    // `prompt length + max_tokens` overflowed (a panic in debug builds; in release a wrapped sum
    // slipped past the context-length check).
    for route in ["/v1/chat/completions", "/v1/completions"] {
        let (status, v) = post(
            route,
            serde_json::json!({"model": "tiny", "max_tokens": u64::MAX, "prompt": "w1",
                "messages": [{"role": "user", "content": "w1"}]}),
        );
        assert_eq!(status, StatusCode::BAD_REQUEST, "{route}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("maximum context length"),
            "{v}"
        );
    }
}
