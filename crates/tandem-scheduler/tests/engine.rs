//! The engine core end to end on a tiny random model: continuous batching with chunked prefill
//! and preemption gives every request the tokens it gets alone; stop conditions hold.

use candle_core::{DType, Device};
use tandem_model::testing::Tiny;
use tandem_model::{load_model, ModelRunner, SamplingParams};
use tandem_scheduler::{FinishReason, LlmEngine, SchedulerConfig};

fn engine(
    dir: &std::path::Path,
    num_blocks: usize,
    max_num_seqs: usize,
    max_batched_tokens: usize,
) -> LlmEngine {
    let m = load_model(Some(dir), &Device::Cpu, DType::F32).unwrap();
    let runner = ModelRunner::new(m.model, num_blocks, 4).unwrap();
    LlmEngine::new(
        runner,
        m.tokenizer,
        SchedulerConfig {
            max_num_seqs,
            max_batched_tokens,
            block_size: 4,
            num_blocks,
            max_model_len: 512,
            max_loras: 4,
            enable_prefix_caching: true,
        },
    )
}

struct Done {
    tokens: Vec<u32>,
    text: String,
    reason: FinishReason,
}

fn run_all(e: &mut LlmEngine, reqs: &[(Vec<u32>, SamplingParams)]) -> Vec<Done> {
    let ids: Vec<u64> = reqs
        .iter()
        .map(|(p, s)| e.add_request(p.clone(), s.clone(), None).unwrap())
        .collect();
    let mut out: Vec<Option<Done>> = (0..reqs.len()).map(|_| None).collect();
    let mut partial: Vec<(Vec<u32>, String)> = vec![(vec![], String::new()); reqs.len()];
    let mut steps = 0;
    while e.has_work() {
        steps += 1;
        assert!(steps < 10_000, "engine does not finish");
        for o in e.step().unwrap() {
            let i = ids.iter().position(|&x| x == o.seq_id).unwrap();
            partial[i].0.extend(o.token);
            partial[i].1.push_str(&o.text);
            if let Some(r) = o.finished {
                let (tokens, text) = std::mem::take(&mut partial[i]);
                out[i] = Some(Done {
                    tokens,
                    text,
                    reason: r,
                });
            }
        }
    }
    out.into_iter().map(|d| d.unwrap()).collect()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

fn setup() -> (tempfile::TempDir, Tiny) {
    let t = Tiny::gqa();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 21);
    (dir, t)
}

#[test]
fn continuous_batching_with_preemption_matches_each_request_alone() {
    let (dir, t) = setup();
    let reqs: Vec<(Vec<u32>, SamplingParams)> = (0..6)
        .map(|s| {
            let prompt: Vec<u32> = (0..(3 + 5 * s))
                .map(|i| ((i * 11 + s * 17 + 3) % t.vocab) as u32)
                .collect();
            (prompt, greedy(6 + 3 * s))
        })
        .collect();
    let alone: Vec<Vec<u32>> = reqs
        .iter()
        .map(|r| {
            run_all(&mut engine(dir.path(), 64, 1, 512), std::slice::from_ref(r))
                .remove(0)
                .tokens
        })
        .collect();
    // 20 blocks of 4 tokens cannot hold all six at once: sequences get preempted and recomputed.
    // A budget of 7 tokens per step forces chunked prefill.
    let mut e = engine(dir.path(), 20, 6, 7);
    let together = run_all(&mut e, &reqs);
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, &b.tokens, "request {i}");
        assert_eq!(b.reason, FinishReason::Length);
        assert_eq!(b.tokens.len(), reqs[i].1.max_tokens);
    }
    assert!(
        e.scheduler.num_preemptions > 0,
        "the test should exercise preemption"
    );
    assert_eq!(e.scheduler.blocks().num_free(), 20, "all blocks returned");
}

#[test]
fn seeded_sampling_is_reproducible_in_any_batch() {
    let (dir, _) = setup();
    let params = |seed| SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        seed: Some(seed),
        max_tokens: 12,
        ignore_eos: true,
        ..Default::default()
    };
    let a = run_all(
        &mut engine(dir.path(), 64, 4, 512),
        &[(vec![5, 6, 7], params(42))],
    )
    .remove(0)
    .tokens;
    let mixed = run_all(
        &mut engine(dir.path(), 64, 4, 512),
        &[
            (vec![9, 9], params(1)),
            (vec![5, 6, 7], params(42)),
            (vec![3], params(2)),
        ],
    );
    assert_eq!(a, mixed[1].tokens);
    let other = run_all(
        &mut engine(dir.path(), 64, 4, 512),
        &[(vec![5, 6, 7], params(43))],
    )
    .remove(0)
    .tokens;
    assert_ne!(a, other, "a different seed should give different tokens");
}

#[test]
fn stop_strings_cut_the_text_and_finish() {
    let (dir, _) = setup();
    let full = run_all(
        &mut engine(dir.path(), 64, 1, 512),
        &[(vec![1, 2, 3], greedy(16))],
    )
    .remove(0);
    // The word-level tokenizer decodes to "wN wM ...": stop at the 5th word.
    let words: Vec<&str> = full.text.split(' ').collect();
    assert!(words.len() >= 8, "{}", full.text);
    let stop = format!(" {}", words[5]);
    let cut = full.text.find(&stop).unwrap();
    let params = SamplingParams {
        stop: vec![stop.clone()],
        ..greedy(16)
    };
    let got = run_all(
        &mut engine(dir.path(), 64, 1, 512),
        &[(vec![1, 2, 3], params)],
    )
    .remove(0);
    assert_eq!(got.reason, FinishReason::Stop);
    assert_eq!(got.text, full.text[..cut]);
}

#[test]
fn eos_finishes_with_stop_and_max_tokens_with_length() {
    let (dir, _) = setup();
    let mut e = engine(dir.path(), 64, 1, 512);
    // Make every token an end token: the first sampled token ends the request.
    e.tokenizer.eos_token_ids = (0..96).collect();
    let params = SamplingParams {
        max_tokens: 5,
        ..Default::default()
    };
    let d = run_all(&mut e, &[(vec![4, 5], params.clone())]).remove(0);
    assert_eq!(
        (d.reason, d.tokens.len(), d.text.as_str()),
        (FinishReason::Stop, 1, "")
    );
    e.tokenizer.eos_token_ids.clear();
    let d = run_all(&mut e, &[(vec![4, 5], params)]).remove(0);
    assert_eq!((d.reason, d.tokens.len()), (FinishReason::Length, 5));
}

#[test]
fn abort_frees_blocks_and_oversized_prompts_are_refused() {
    let (dir, _) = setup();
    let mut e = engine(dir.path(), 8, 2, 512);
    let id = e.add_request(vec![1; 10], greedy(20), None).unwrap();
    e.step().unwrap();
    assert!(e.scheduler.blocks().num_free() < 8);
    e.abort(id);
    assert_eq!(e.scheduler.blocks().num_free(), 8);
    assert!(!e.has_work());
    let err = e
        .add_request(vec![1; 600], greedy(4), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("context window is 512"), "{err}");
    let err = e
        .add_request(vec![1; 40], greedy(4), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("KV blocks"), "{err}");
}

#[test]
fn requests_through_different_adapters_batch_together_within_max_loras() {
    use tandem_model::lora::{Proj, RegistryConfig};
    use tandem_model::testing::random_adapter;
    let (dir, t) = setup();
    let make = |max_loras: usize| {
        let m = load_model(Some(dir.path()), &Device::Cpu, DType::F32).unwrap();
        let runner = ModelRunner::with_adapters(
            m.model,
            64,
            4,
            RegistryConfig {
                max_loras,
                max_lora_rank: 16,
            },
        )
        .unwrap();
        let mut e = LlmEngine::new(
            runner,
            m.tokenizer,
            SchedulerConfig {
                max_num_seqs: 8,
                max_batched_tokens: 64,
                block_size: 4,
                num_blocks: 64,
                max_model_len: 512,
                max_loras,
                enable_prefix_caching: true,
            },
        );
        for i in 0..3u64 {
            let p = dir.path().join(format!("lora{i}"));
            if !p.exists() {
                random_adapter(
                    &t.model_config(),
                    4 + 4 * i as usize,
                    16.0,
                    &Proj::ALL,
                    false,
                    40 + i,
                )
                .save(&p)
                .unwrap();
            }
            e.runner.adapters.register(&format!("lora{i}"), &p).unwrap();
        }
        e
    };
    let run = |e: &mut LlmEngine, reqs: &[(Vec<u32>, Option<&str>)]| -> Vec<Vec<u32>> {
        let ids: Vec<u64> = reqs
            .iter()
            .map(|(p, a)| e.add_request(p.clone(), greedy(8), *a).unwrap())
            .collect();
        let mut out = vec![vec![]; reqs.len()];
        while e.has_work() {
            for o in e.step().unwrap() {
                out[ids.iter().position(|&x| x == o.seq_id).unwrap()].extend(o.token);
            }
        }
        out
    };
    let reqs: Vec<(Vec<u32>, Option<&str>)> = vec![
        (vec![3, 4, 5], Some("lora0")),
        (vec![3, 4, 5], None),
        (vec![3, 4, 5], Some("lora1")),
        (vec![9, 8], Some("lora2")),
        (vec![3, 4, 5], Some("lora0")),
    ];
    let alone: Vec<Vec<u32>> = reqs
        .iter()
        .map(|r| run(&mut make(3), std::slice::from_ref(r)).remove(0))
        .collect();
    assert_ne!(
        alone[0], alone[1],
        "the adapter should change greedy tokens"
    );
    assert_ne!(alone[0], alone[2]);
    assert_eq!(alone[0], alone[4]);
    // Only two adapters may be live at once: the third waits, then runs, and nothing changes.
    let mut e = make(2);
    assert_eq!(run(&mut e, &reqs), alone);
    let err = e
        .add_request(vec![1], greedy(2), Some("nope"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope"), "{err}");
}
