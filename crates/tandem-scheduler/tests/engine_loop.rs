//! The engine thread driven from async tasks: concurrent requests each get the tokens they get
//! alone; a dropped receiver frees its KV blocks; adapters load and unload at run time.

use candle_core::{DType, Device};
use tandem_model::lora::{Proj, RegistryConfig};
use tandem_model::testing::{random_adapter, Tiny};
use tandem_model::{load_model, ModelRunner, SamplingParams};
use tandem_scheduler::{
    EngineError, EngineHandle, Event, FinishReason, GenerateRequest, LlmEngine, SchedulerConfig,
};

fn engine(dir: &std::path::Path, num_blocks: usize) -> LlmEngine {
    let m = load_model(Some(dir), &Device::Cpu, DType::F32).unwrap();
    let runner = ModelRunner::with_adapters(
        m.model,
        num_blocks,
        4,
        RegistryConfig {
            max_loras: 2,
            max_lora_rank: 8,
        },
    )
    .unwrap();
    LlmEngine::new(
        runner,
        m.tokenizer,
        SchedulerConfig {
            max_num_seqs: 16,
            max_batched_tokens: 48,
            block_size: 4,
            num_blocks,
            max_model_len: 512,
            max_loras: 2,
            enable_prefix_caching: true,
        },
    )
}

fn req(prompt: Vec<u32>, max_tokens: usize, adapter: Option<&str>) -> GenerateRequest {
    GenerateRequest {
        prompt,
        params: SamplingParams {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        },
        adapter: adapter.map(str::to_string),
        cache_salt: None,
        span: tracing::Span::none(),
    }
}

async fn collect(h: &EngineHandle, r: GenerateRequest) -> (Vec<u32>, FinishReason, usize, usize) {
    let (_, mut rx) = h.generate(r).await.unwrap();
    let mut toks = vec![];
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { id, .. } => toks.push(id),
            Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                ..
            } => return (toks, reason, prompt_tokens, completion_tokens),
            Event::Failed(e) => panic!("{e}"),
        }
    }
    panic!("stream ended without Finished")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_equal_each_alone_and_dropped_clients_free_blocks() {
    let t = Tiny::gqa();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 51);
    let reqs: Vec<GenerateRequest> = (0..12)
        .map(|s| {
            req(
                (0..(2 + s * 3))
                    .map(|i| ((i * 7 + s * 5 + 1) % t.vocab) as u32)
                    .collect(),
                3 + s % 5,
                None,
            )
        })
        .collect();
    let mut alone = vec![];
    for r in &reqs {
        let h = EngineHandle::spawn(engine(dir.path(), 64)).unwrap();
        alone.push(collect(&h, r.clone()).await.0);
    }
    // 40 blocks of 4 tokens for 12 requests: they share the cache, some get preempted.
    let h = EngineHandle::spawn(engine(dir.path(), 40)).unwrap();
    let tasks: Vec<_> = reqs
        .iter()
        .cloned()
        .map(|r| {
            let h = h.clone();
            tokio::spawn(async move { collect(&h, r).await })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let (toks, reason, prompt, completion) = task.await.unwrap();
        assert_eq!(toks, alone[i], "request {i}");
        assert_eq!(
            (reason, prompt, completion),
            (FinishReason::Length, reqs[i].prompt.len(), toks.len())
        );
    }
    // A client that goes away mid-generation: its blocks come back.
    let (_, mut rx) = h.generate(req(vec![1, 2, 3], 400, None)).await.unwrap();
    for _ in 0..3 {
        rx.recv().await.unwrap();
    }
    assert!(h.stats().await.unwrap().free_blocks < 40);
    drop(rx);
    let mut freed = false;
    for _ in 0..200 {
        let s = h.stats().await.unwrap();
        if s.free_blocks == 40 && s.running == 0 {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(freed, "blocks of a dropped request were not freed");
    // Refused requests say why.
    match h.generate(req(vec![1; 600], 4, None)).await {
        Err(EngineError::Admit(e)) => assert!(e.to_string().contains("context window"), "{e}"),
        other => panic!("{:?}", other.map(|(id, _)| id)),
    }
}

#[tokio::test]
async fn adapters_load_and_unload_at_run_time() {
    let t = Tiny::gqa();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 52);
    let p = dir.path().join("lora");
    random_adapter(&t.model_config(), 4, 8.0, &Proj::ALL, false, 9)
        .save(&p)
        .unwrap();
    let h = EngineHandle::spawn(engine(dir.path(), 64)).unwrap();
    let base = collect(&h, req(vec![4, 5, 6], 6, None)).await.0;
    h.load_adapter("mine".into(), p.clone()).await.unwrap();
    assert_eq!(h.stats().await.unwrap().adapters, vec!["mine"]);
    let tuned = collect(&h, req(vec![4, 5, 6], 6, Some("mine"))).await.0;
    assert_ne!(base, tuned);
    let err = h
        .load_adapter("mine".into(), p)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("already loaded"), "{err}");
    h.unload_adapter("mine".into()).await.unwrap();
    match h.generate(req(vec![4], 2, Some("mine"))).await {
        Err(EngineError::Admit(e)) => assert!(e.to_string().contains("mine")),
        other => panic!("{:?}", other.map(|(id, _)| id)),
    }
    assert!(h.unload_adapter("mine".into()).await.is_err());
}
