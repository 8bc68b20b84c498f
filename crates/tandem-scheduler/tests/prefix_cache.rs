//! Automatic prefix caching on a tiny random model: outputs (greedy tokens, logprobs, seeded
//! samples) are the same with caching on and off while requests do hit the cache; blocks are
//! never shared across adapters, adapter weight versions (a reload under the same name, a
//! co-served job's optimizer steps) or cache salts; eviction and preemption stay exact.

use candle_core::{DType, Device};
use std::time::Duration;
use tandem_model::finetune::{TrainableLora, TrainingRun};
use tandem_model::lora::{Proj, RegistryConfig};
use tandem_model::testing::{random_adapter, tiny_examples, tiny_train_config, Tiny};
use tandem_model::{load_model, ModelRunner, SamplingParams, TokenLogprobs};
use tandem_scheduler::{CoserveConfig, CoserveMode, LlmEngine, SchedulerConfig};

fn engine(dir: &std::path::Path, caching: bool, num_blocks: usize, budget: usize) -> LlmEngine {
    let m = load_model(Some(dir), &Device::Cpu, DType::F32).unwrap();
    let lora = RegistryConfig {
        max_loras: 4,
        max_lora_rank: 16,
    };
    let runner = ModelRunner::with_adapters(m.model, num_blocks, 4, lora).unwrap();
    let mut e = LlmEngine::new(
        runner,
        m.tokenizer,
        SchedulerConfig {
            max_num_seqs: 8,
            max_batched_tokens: budget,
            block_size: 4,
            num_blocks,
            max_model_len: 512,
            max_loras: 4,
            enable_prefix_caching: caching,
        },
    );
    e.coserve = CoserveConfig {
        mode: CoserveMode::Coserve,
        tpot_slo: Duration::from_millis(5),
        ..Default::default()
    };
    e
}

#[derive(Clone)]
struct Req {
    prompt: Vec<u32>,
    params: SamplingParams,
    adapter: Option<&'static str>,
    salt: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq)]
struct Out {
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprobs>,
}

/// Runs `reqs` concurrently to the end; each output with its cached prompt tokens.
fn run(e: &mut LlmEngine, reqs: &[Req]) -> Vec<(Out, usize)> {
    let ids: Vec<u64> = reqs
        .iter()
        .map(|r| {
            e.add_request_salted(
                r.prompt.clone(),
                r.params.clone(),
                r.adapter,
                r.salt.map(str::to_string),
            )
            .unwrap()
        })
        .collect();
    let mut out: Vec<(Out, usize)> = vec![
        (
            Out {
                tokens: vec![],
                logprobs: vec![]
            },
            0
        );
        reqs.len()
    ];
    let mut steps = 0;
    while e.has_work() {
        steps += 1;
        assert!(steps < 20_000, "engine does not finish");
        for o in e.step().unwrap() {
            let Some(i) = ids.iter().position(|&x| x == o.seq_id) else {
                continue;
            };
            out[i].0.tokens.extend(o.token);
            out[i].0.logprobs.extend(o.logprobs);
            if o.finished.is_some() {
                out[i].1 = o.cached_tokens;
            }
        }
        if e.scheduler.num_running() == 0 && e.scheduler.num_waiting() == 0 {
            break; // only a job is left
        }
    }
    out
}

/// Each request to the end before the next starts (later ones find earlier ones' blocks).
fn run_one_by_one(e: &mut LlmEngine, reqs: &[Req]) -> Vec<(Out, usize)> {
    reqs.iter()
        .flat_map(|r| run(e, std::slice::from_ref(r)))
        .collect()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        logprobs: Some(3),
        ..Default::default()
    }
}

fn sampled(max_tokens: usize, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        ..greedy(max_tokens)
    }
}

fn base(prompt: Vec<u32>, params: SamplingParams) -> Req {
    Req {
        prompt,
        params,
        adapter: None,
        salt: None,
    }
}

fn setup() -> (tempfile::TempDir, Tiny) {
    let t = Tiny::gqa();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 21);
    (dir, t)
}

fn prompt(t: &Tiny, len: usize, salt: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 13 + salt * 29 + 5) % t.vocab) as u32)
        .collect()
}

fn outs(v: &[(Out, usize)]) -> Vec<Out> {
    v.iter().map(|(o, _)| o.clone()).collect()
}

/// The same tokens, top candidates and log-probabilities, bit for bit: every product of the
/// forward is batch-invariant on the CPU (`tandem_kernels::dense`, the paged attention kernel),
/// so a token's numbers do not depend on whether its prefix came from the cache, how its prompt
/// was chunked or what else was batched with it.
fn assert_same(got: &[Out], want: &[Out], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g, w, "{what}: request {i}");
    }
}

#[test]
fn outputs_are_the_same_with_caching_on_and_off_and_shared_prefixes_hit() {
    let (dir, t) = setup();
    let p = prompt(&t, 37, 0);
    let mut reqs = vec![
        base(p.clone(), greedy(6)),
        base(p.clone(), greedy(6)),       // the same prompt again
        base(p[..8].to_vec(), greedy(5)), // exactly two blocks: the last token is recomputed
        base(p[..9].to_vec(), greedy(5)), // a block boundary plus one
        base([&p[..21], &prompt(&t, 10, 3)[..]].concat(), greedy(5)), // shares 5 blocks
        base(prompt(&t, 30, 7), greedy(4)), // unrelated
    ];
    // n > 1: choices of one prompt with their own seeds.
    for seed in 1..=3 {
        reqs.push(base(p.clone(), sampled(7, seed)));
    }
    let mut off = engine(dir.path(), false, 128, 512);
    let want = run_one_by_one(&mut off, &reqs);
    assert!(want.iter().all(|(_, c)| *c == 0), "caching off: no hits");
    // A second turn: the first turn's prompt and answer, then a new user message.
    let turn2 = [&p[..], &want[0].0.tokens[..], &prompt(&t, 6, 9)[..]].concat();
    reqs.push(base(turn2.clone(), greedy(5)));
    let want_turn2 = run(&mut off, &reqs[reqs.len() - 1..]);
    let want: Vec<Out> = outs(&want).into_iter().chain(outs(&want_turn2)).collect();

    let mut on = engine(dir.path(), true, 128, 512);
    let got = run_one_by_one(&mut on, &reqs);
    assert_same(&outs(&got), &want, "one by one with caching");
    let cached: Vec<usize> = got.iter().map(|(_, c)| *c).collect();
    assert_eq!(cached[0], 0);
    assert_eq!(cached[1], 36, "all full blocks of the 37-token prompt");
    assert_eq!(cached[2], 4, "an 8-token prompt recomputes its last block");
    assert_eq!(cached[3], 8);
    assert_eq!(cached[4], 20);
    assert_eq!(cached[5], 0);
    assert!(cached[6..9].iter().all(|&c| c == 36));
    // The second turn finds the first turn's prompt and its generated tokens.
    assert_eq!(cached[9], (p.len() + 6) / 4 * 4);
    assert_eq!(
        on.scheduler.prefix_cache_hits,
        cached.iter().sum::<usize>() as u64
    );
    let queried: usize = reqs.iter().map(|r| r.prompt.len()).sum();
    assert_eq!(on.scheduler.prefix_cache_queries, queried as u64);

    // Concurrently, with a small token budget (chunked prefill): the same outputs again.
    let mut on = engine(dir.path(), true, 128, 7);
    run(&mut on, &reqs[..1]);
    let got = run(&mut on, &reqs);
    assert_same(&outs(&got), &want, "concurrent with caching");
    // Everything but the unrelated prompt (5) finds the warmed-up prompt's blocks.
    for (i, (_, c)) in got.iter().enumerate() {
        assert_eq!(*c > 0, i != 5, "request {i}: {c} cached tokens");
    }
    assert_eq!(
        on.scheduler.blocks().num_free(),
        128,
        "every block returned"
    );
}

fn adapter_dir(t: &Tiny, root: &std::path::Path, name: &str, seed: u64) -> std::path::PathBuf {
    let p = root.join(name);
    random_adapter(&t.model_config(), 4, 16.0, &Proj::ALL, false, seed)
        .save(&p)
        .unwrap();
    p
}

#[test]
fn adapters_reloads_and_salts_never_share_blocks() {
    let (dir, t) = setup();
    let a = adapter_dir(&t, dir.path(), "a", 1);
    let b = adapter_dir(&t, dir.path(), "b", 2);
    let p = prompt(&t, 25, 1);
    let via = |adapter, salt| Req {
        prompt: p.clone(),
        params: greedy(6),
        adapter,
        salt,
    };
    let reference = |adapter_path: Option<&std::path::Path>| {
        let mut e = engine(dir.path(), false, 64, 512);
        let adapter = adapter_path.map(|path| {
            e.runner.adapters.register("x", path).unwrap();
            "x"
        });
        run(&mut e, &[via(adapter, None)]).remove(0).0
    };
    let mut e = engine(dir.path(), true, 64, 512);
    e.runner.adapters.register("x", &a).unwrap();
    e.runner.adapters.register("y", &b).unwrap();
    let got = run_one_by_one(
        &mut e,
        &[
            via(Some("x"), None),
            via(Some("y"), None), // same prompt, another adapter: nothing shared
            via(None, None),      // nor with the base model
            via(Some("x"), None), // the first adapter again: hit
        ],
    );
    let cached: Vec<usize> = got.iter().map(|(_, c)| *c).collect();
    assert_eq!(cached, vec![0, 0, 0, 24]);
    let got_outs = outs(&got);
    assert_same(
        &got_outs[..3],
        &[reference(Some(&a)), reference(Some(&b)), reference(None)],
        "adapters",
    );
    assert_same(&got_outs[3..], &got_outs[..1], "the first adapter again");
    assert_ne!(got[0].0.tokens, got[2].0.tokens, "the adapter matters");

    // "x" unloaded and loaded again with other weights: no stale blocks.
    e.runner.adapters.unregister("x").unwrap();
    e.runner.adapters.register("x", &b).unwrap();
    let again = run(&mut e, &[via(Some("x"), None)]).remove(0);
    assert_eq!(
        again.1, 0,
        "a reloaded adapter must not find the old weights' blocks"
    );
    assert_same(&[again.0], &[reference(Some(&b))], "reloaded");

    // Salts: the base model's blocks for this prompt exist, but not under a salt.
    let salted = run_one_by_one(
        &mut e,
        &[
            via(None, Some("tenant-a")),
            via(None, Some("tenant-b")),
            via(None, Some("tenant-a")),
            via(None, None),
        ],
    );
    let cached: Vec<usize> = salted.iter().map(|(_, c)| *c).collect();
    assert_eq!(cached, vec![0, 0, 24, 24]);
    assert_same(&outs(&salted), &vec![got[2].0.clone(); 4], "salted");
}

#[test]
fn a_trained_adapter_never_reuses_blocks_across_optimizer_steps() {
    let (dir, t) = setup();
    let mut e = engine(dir.path(), true, 64, 64);
    let cfg = tiny_train_config();
    let lora = TrainableLora::new(
        &e.runner.model.cfg,
        cfg.spec().unwrap(),
        e.runner.model.device(),
        0,
    )
    .unwrap();
    let run_ = TrainingRun::new(tiny_examples(t.vocab as u32), cfg, lora).unwrap();
    e.start_job("ft", run_).unwrap();
    let p = prompt(&t, 22, 4);
    let req = Req {
        prompt: p.clone(),
        params: greedy(5),
        adapter: Some("ft"),
        salt: None,
    };
    // The job's weights now, served from scratch by an engine without caching.
    let reference = |e: &LlmEngine, name: &str| {
        let path = dir.path().join(name);
        e.jobs[0]
            .run
            .lora
            .to_adapter(None)
            .unwrap()
            .save(&path)
            .unwrap();
        let mut fresh = engine(dir.path(), false, 64, 64);
        fresh.runner.adapters.register("ft", &path).unwrap();
        run(&mut fresh, std::slice::from_ref(&req)).remove(0).0
    };
    let train_until = |e: &mut LlmEngine, step: usize| {
        let _ = e.pause_job("ft", false); // running already the first time
        let mut n = 0;
        while e.jobs[0].run.step < step {
            e.step().unwrap();
            n += 1;
            assert!(n < 100_000);
        }
        e.pause_job("ft", true).unwrap();
    };
    train_until(&mut e, 1);
    let first = run_one_by_one(&mut e, &[req.clone(), req.clone()]);
    assert_eq!((first[0].1, first[1].1), (0, 20), "same weights: a hit");
    assert_same(&[first[1].0.clone()], &[first[0].0.clone()], "a hit");
    assert_same(&[first[0].0.clone()], &[reference(&e, "step1")], "step 1");
    train_until(&mut e, 2);
    let second = run(&mut e, std::slice::from_ref(&req)).remove(0);
    assert_eq!(
        second.1, 0,
        "an optimizer step changed the weights: no reuse"
    );
    assert_same(
        std::slice::from_ref(&second.0),
        &[reference(&e, "step2")],
        "step 2",
    );
    assert_ne!(second.0.logprobs, first[0].0.logprobs);
}

#[test]
fn eviction_and_preemption_under_kv_pressure_keep_outputs_exact() {
    let (dir, t) = setup();
    let shared = prompt(&t, 12, 2);
    let reqs: Vec<Req> = (0..8)
        .map(|k| {
            let tail = prompt(&t, 3 + k, 10 + k);
            base([&shared[..], &tail[..]].concat(), greedy(14 + k % 3))
        })
        .collect();
    let alone: Vec<Out> = reqs
        .iter()
        .map(|r| {
            run(
                &mut engine(dir.path(), false, 64, 512),
                std::slice::from_ref(r),
            )
            .remove(0)
            .0
        })
        .collect();
    // 16 blocks of 4 tokens hold about two of these at once: preemption, and cached blocks
    // evicted for new ones.
    let mut e = engine(dir.path(), true, 16, 7);
    for round in 0..2 {
        let got = run(&mut e, &reqs);
        assert_same(&outs(&got), &alone, &format!("round {round}"));
    }
    assert!(e.scheduler.num_preemptions > 0, "should preempt");
    assert!(e.scheduler.blocks().evictions > 0, "should evict");
    assert!(e.scheduler.prefix_cache_hits > 0, "should hit");
    assert_eq!(e.scheduler.blocks().num_free(), 16);
}
