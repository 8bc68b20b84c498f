//! The engine, requests and run loop the co-serving tests share (a tiny model, 4-slot KV
//! blocks, a 16-token batch budget).
#![allow(dead_code)]

use candle_core::{DType, Device};
use std::time::Duration;
use tandem_model::testing::Tiny;
use tandem_model::{load_model, ModelRunner, SamplingParams};
use tandem_scheduler::{CoserveConfig, CoserveMode, FinishReason, LlmEngine, SchedulerConfig};

pub fn engine(dir: &std::path::Path, mode: CoserveMode) -> LlmEngine {
    engine_with_blocks(dir, mode, 64)
}

pub fn engine_with_blocks(
    dir: &std::path::Path,
    mode: CoserveMode,
    num_blocks: usize,
) -> LlmEngine {
    let m = load_model(Some(dir), &Device::Cpu, DType::F32).unwrap();
    let runner = ModelRunner::new(m.model, 64, 4).unwrap();
    let mut e = LlmEngine::new(
        runner,
        m.tokenizer,
        SchedulerConfig {
            max_num_seqs: 8,
            max_batched_tokens: 16,
            block_size: 4,
            num_blocks,
            max_model_len: 512,
            max_loras: 4,
            enable_prefix_caching: true,
        },
    );
    e.coserve = CoserveConfig {
        mode,
        tpot_slo: Duration::from_millis(5),
        temporal_every: 3,
        ..Default::default()
    };
    e
}

pub fn requests() -> Vec<(Vec<u32>, SamplingParams)> {
    (0..5u32)
        .map(|k| {
            let prompt = (0..(3 + k * 2))
                .map(|i| (i * 11 + k * 7 + 2) % 90)
                .collect();
            let params = SamplingParams {
                max_tokens: 6 + k as usize,
                ignore_eos: true,
                ..Default::default()
            };
            (prompt, params)
        })
        .collect()
}

/// A tiny GQA model written as an HF directory, with its vocabulary size.
pub fn gqa_model() -> (Tiny, tempfile::TempDir, u32) {
    let t = Tiny::gqa();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 3);
    let vocab = t.vocab as u32;
    (t, dir, vocab)
}

/// Runs every request to the end: (generated tokens, text, finish reason) each.
pub fn run_all(
    e: &mut LlmEngine,
    reqs: &[(Vec<u32>, SamplingParams)],
) -> Vec<(Vec<u32>, String, FinishReason)> {
    let ids: Vec<u64> = reqs
        .iter()
        .map(|(p, s)| e.add_request(p.clone(), s.clone(), None).unwrap())
        .collect();
    let mut out: Vec<(Vec<u32>, String, Option<FinishReason>)> =
        vec![(vec![], String::new(), None); reqs.len()];
    let mut steps = 0;
    while e.has_work() {
        steps += 1;
        assert!(steps < 20_000, "engine does not finish");
        for o in e.step().unwrap() {
            let i = ids.iter().position(|&x| x == o.seq_id).unwrap();
            out[i].0.extend(o.token);
            out[i].1.push_str(&o.text);
            if o.finished.is_some() {
                out[i].2 = o.finished;
            }
        }
    }
    out.into_iter()
        .map(|(t, s, r)| (t, s, r.expect("finished")))
        .collect()
}

/// Runs the engine until it is idle; returns each request's tokens.
pub fn run(e: &mut LlmEngine, reqs: &[(Vec<u32>, SamplingParams)]) -> Vec<Vec<u32>> {
    run_all(e, reqs).into_iter().map(|(t, _, _)| t).collect()
}
