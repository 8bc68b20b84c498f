//! Co-serving on a tiny random model: a finetuning job runs in the same engine iterations as
//! inference requests. In every mode the job trains exactly the adapter that `Finetuner` trains
//! alone on the same data, greedy inference outputs are the same as with no job running, the
//! adapter is served under the job's name while and after it trains, and KV blocks come back.

use candle_core::{DType, Device};
use tandem_model::finetune::{Example, Finetuner, TrainConfig, TrainableLora, TrainingRun};
use tandem_model::load_model;
use tandem_model::testing::{adapter_max_abs_diff, tiny_examples, tiny_train_config, Tiny};
use tandem_scheduler::{CoserveMode, JobState, LlmEngine};

mod common;
use common::*;

/// The adapter `Finetuner` trains alone on `data` (the reference for co-served jobs).
fn standalone(dir: &std::path::Path, data: Vec<Example>) -> tandem_model::lora::LoraAdapter {
    let m = load_model(Some(dir), &Device::Cpu, DType::F32).unwrap();
    let mut alone = Finetuner::new(&m.model, data, tiny_train_config(), None).unwrap();
    while !alone.is_done() {
        alone.train_step().unwrap();
    }
    alone.adapter().unwrap()
}

#[test]
fn coserved_job_trains_the_standalone_adapter_and_leaves_inference_unchanged() {
    let (_t, dir, vocab) = gqa_model();
    // The reference: the same run alone.
    let want = standalone(dir.path(), tiny_examples(vocab));
    let reqs = requests();
    let base = run(&mut engine(dir.path(), CoserveMode::Coserve), &reqs);

    for mode in [
        CoserveMode::Coserve,
        CoserveMode::Temporal,
        CoserveMode::FinetuneOnly,
    ] {
        let mut e = engine(dir.path(), mode);
        let free = e.scheduler.blocks().num_free();
        let lora = TrainableLora::new(
            &e.runner.model.cfg,
            tiny_train_config().spec().unwrap(),
            &Device::Cpu,
            5,
        )
        .unwrap();
        let run_ = TrainingRun::new(tiny_examples(vocab), tiny_train_config(), lora).unwrap();
        let total = run_.total_steps();
        e.start_job("ft", run_).unwrap();
        assert!(e
            .start_job(
                "ft",
                TrainingRun::new(
                    tiny_examples(vocab),
                    tiny_train_config(),
                    TrainableLora::new(
                        &e.runner.model.cfg,
                        tiny_train_config().spec().unwrap(),
                        &Device::Cpu,
                        5
                    )
                    .unwrap()
                )
                .unwrap()
            )
            .is_err());
        let got = run(&mut e, &reqs);
        assert_eq!(got, base, "{mode:?}: inference changed while a job ran");
        let job = &e.jobs[0];
        assert_eq!(job.state, JobState::Succeeded, "{mode:?}");
        assert_eq!(job.reports.len(), total);
        assert!(job.forward_tokens > 0 && job.backward_steps > 0);
        let c = e.counters;
        assert_eq!(c.finetune_forward_tokens, job.forward_tokens);
        assert_eq!(c.finetune_backward_steps, job.backward_steps);
        assert!(c.decode_tokens > 0 && c.prefill_tokens > 0);
        if mode == CoserveMode::Coserve {
            assert!(
                c.mixed_iterations > 0,
                "no iteration ran inference and finetuning together"
            );
        }
        assert_eq!(
            e.scheduler.blocks().num_free(),
            free,
            "{mode:?}: KV blocks leaked"
        );
        let adapter = job.run.lora.to_adapter(None).unwrap();
        let d = adapter_max_abs_diff(&want, &adapter);
        assert!(
            d <= 1e-5,
            "{mode:?}: max abs diff {d} from the standalone run"
        );
        // Served under its name: requests through it differ from the base model's.
        let through = {
            let id = e
                .add_request(reqs[1].0.clone(), reqs[1].1.clone(), Some("ft"))
                .unwrap();
            let mut toks = Vec::new();
            while e.has_work() {
                for o in e.step().unwrap() {
                    if o.seq_id == id {
                        toks.extend(o.token);
                    }
                }
            }
            toks
        };
        assert_ne!(
            through, base[1],
            "{mode:?}: the trained adapter changed nothing"
        );
    }
}

/// Short examples packed into units (chunks of 16: units of two and of one): the engine's
/// job runs one backward step per layer for a unit, and, in iterations without inference, the
/// unit's forward with its graphs kept (no recompute). It trains the adapter the standalone
/// `Finetuner` trains, which packs and keeps the same way, and the one it trains recomputing.
#[test]
fn packed_units_and_kept_graphs_train_the_standalone_adapter() {
    let (_t, dir, vocab) = gqa_model();
    let cfg = TrainConfig {
        chunk_tokens: 16,
        ..tiny_train_config()
    };
    let m = load_model(Some(dir.path()), &Device::Cpu, DType::F32).unwrap();
    let alone = |keep: bool| {
        let mut f = Finetuner::new(&m.model, tiny_examples(vocab), cfg.clone(), None).unwrap();
        if !keep {
            f.keep_budget = 0;
        }
        let mut peak = 0;
        while !f.is_done() {
            peak = peak.max(f.train_step().unwrap().peak_activation_bytes);
        }
        (f.adapter().unwrap(), peak)
    };
    let (want, kept_peak) = alone(true);
    let (recomputed, recompute_peak) = alone(false);
    assert!(
        kept_peak > recompute_peak,
        "kept graphs hold more: {kept_peak} vs {recompute_peak}"
    );
    assert!(adapter_max_abs_diff(&want, &recomputed) <= 1e-5);
    let reqs = requests();
    // (mode, keep graphs, inference requests)
    for (mode, keep, load) in [
        (CoserveMode::Coserve, true, false),
        (CoserveMode::Coserve, true, true),
        (CoserveMode::Coserve, false, true),
        (CoserveMode::FinetuneOnly, true, true),
    ] {
        let mut e = engine(dir.path(), mode);
        if !keep {
            e.keep_budget = 0;
        }
        let free = e.scheduler.blocks().num_free();
        let lora =
            TrainableLora::new(&e.runner.model.cfg, cfg.spec().unwrap(), &Device::Cpu, 5).unwrap();
        e.start_job(
            "ft",
            TrainingRun::new(tiny_examples(vocab), cfg.clone(), lora).unwrap(),
        )
        .unwrap();
        run(&mut e, if load { &reqs } else { &[] });
        let job = &e.jobs[0];
        assert_eq!(job.state, JobState::Succeeded, "{mode:?}");
        assert_eq!(e.counters.finetune_forward_tokens, job.forward_tokens);
        assert_eq!(
            e.scheduler.blocks().num_free(),
            free,
            "{mode:?}: KV blocks leaked"
        );
        let peak = job.reports.iter().map(|r| r.peak_activation_bytes).max();
        if !load {
            // Never inference in its iterations: every unit kept its graphs.
            assert_eq!(peak, Some(kept_peak), "{mode:?}");
        }
        if !keep {
            assert_eq!(peak, Some(recompute_peak), "{mode:?}, recomputing");
        }
        let d = adapter_max_abs_diff(&want, &job.run.lora.to_adapter(None).unwrap());
        assert!(
            d <= 1e-5,
            "{mode:?}, keep {keep}: max abs diff {d} from the standalone run"
        );
    }
}

#[test]
fn jobs_pause_resume_and_cancel() {
    let t = Tiny::tied_mha();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 4);
    let mut e = engine(dir.path(), CoserveMode::Coserve);
    let lora = TrainableLora::new(
        &e.runner.model.cfg,
        tiny_train_config().spec().unwrap(),
        &Device::Cpu,
        1,
    )
    .unwrap();
    e.start_job(
        "a",
        TrainingRun::new(tiny_examples(t.vocab as u32), tiny_train_config(), lora).unwrap(),
    )
    .unwrap();
    e.step().unwrap();
    e.pause_job("a", true).unwrap();
    assert!(!e.has_work(), "a paused job is no work");
    assert!(e.pause_job("a", true).is_err());
    e.pause_job("a", false).unwrap();
    e.step().unwrap();
    // Each job holds one of the 4 adapter slots; requests always keep one.
    assert_eq!(e.scheduler.cfg.max_loras, 3);
    let cfg = e.runner.model.cfg.clone();
    let run = |seed| {
        let spec = tiny_train_config().spec().unwrap();
        let lora = TrainableLora::new(&cfg, spec, &Device::Cpu, seed).unwrap();
        TrainingRun::new(tiny_examples(t.vocab as u32), tiny_train_config(), lora).unwrap()
    };
    e.start_job("b", run(2)).unwrap();
    assert_eq!(e.scheduler.cfg.max_loras, 2);
    e.start_job("c", run(3)).unwrap();
    assert_eq!(e.scheduler.cfg.max_loras, 1);
    let err = e.start_job("d", run(4)).unwrap_err();
    assert!(err.contains("no adapter slot"), "{err}");
    e.cancel_job("c").unwrap();
    e.cancel_job("b").unwrap();
    e.cancel_job("a").unwrap();
    assert_eq!(e.scheduler.cfg.max_loras, 4);
    assert_eq!(e.jobs[0].state, JobState::Cancelled);
    assert!(!e.has_work());
    assert_eq!(e.scheduler.blocks().num_free(), 64);
    assert!(e.cancel_job("a").is_err());
    assert!(e.cancel_job("nope").is_err());
}

/// A job handed to another replica: paused, checkpointed at its last step (not again when it
/// has one there), released (stopped, its name free, its blocks and slot back), then started
/// again under the same name from that checkpoint, as the replica that claims it does; it
/// ends with the adapter of a job that ran straight through.
#[test]
fn a_released_job_resumes_from_its_last_step_under_the_same_name() {
    let t = Tiny::tied_mha();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 4);
    let data = tiny_examples(t.vocab as u32);
    let want = standalone(dir.path(), data.clone());
    let ck = tempfile::tempdir().unwrap();
    let mut e = engine(dir.path(), CoserveMode::FinetuneOnly);
    e.start_job("a", job_run(&e, data.clone())).unwrap();
    e.set_job_checkpoints("a", ck.path().to_path_buf(), 1000)
        .unwrap();
    while e.jobs[0].reports.len() < 2 {
        e.step().unwrap();
    }
    e.pause_job("a", true).unwrap();
    let w = e.checkpoint_job("a").unwrap().unwrap();
    assert_eq!((w.step, w.name.as_str()), (2, "a:ckpt-step-2"));
    assert_eq!(w.path, ck.path().join("step-2"));
    assert!(
        e.checkpoint_job("a").unwrap().is_none(),
        "one there already"
    );
    e.release_job("a").unwrap();
    assert!(e.jobs.is_empty());
    assert!(e.runner.adapters.id("a").is_none());
    assert!(
        e.runner.adapters.id("a:ckpt-step-2").is_some(),
        "still served"
    );
    assert_eq!(e.scheduler.cfg.max_loras, 4);
    assert_eq!(e.scheduler.blocks().num_free(), 64);
    assert!(e.release_job("a").is_err());

    let m = load_model(Some(dir.path()), &Device::Cpu, DType::F32).unwrap();
    let (resumed, _) = TrainingRun::resume(&w.path, data, &m.model.cfg, &Device::Cpu).unwrap();
    assert_eq!(resumed.step, 2);
    e.start_job("a", resumed).unwrap();
    while !e.jobs[0].state.is_final() {
        e.step().unwrap();
    }
    assert_eq!(e.jobs[0].state, JobState::Succeeded);
    let got = e.jobs[0].run.lora.to_adapter(None).unwrap();
    let d = adapter_max_abs_diff(&want, &got);
    assert!(d <= 1e-5, "released and resumed vs straight: {d}");
}

fn job_run(e: &LlmEngine, data: Vec<Example>) -> TrainingRun {
    let spec = tiny_train_config().spec().unwrap();
    let lora = TrainableLora::new(&e.runner.model.cfg, spec, &Device::Cpu, 5).unwrap();
    TrainingRun::new(data, tiny_train_config(), lora).unwrap()
}

/// Training sequences of 20-28 tokens (5-7 KV blocks of 4), held for many iterations.
fn long_examples(vocab: u32) -> Vec<Example> {
    (0..5u32)
        .map(|k| {
            let n = 20 + 2 * k as usize;
            Example {
                tokens: (0..n as u32).map(|i| (i * 5 + k * 3 + 1) % vocab).collect(),
                target: (0..n).map(|i| i >= 4).collect(),
            }
        })
        .collect()
}

#[test]
fn kv_pressure_takes_the_jobs_blocks_first_and_training_stays_exact() {
    let (_t, dir, vocab) = gqa_model();
    let want = standalone(dir.path(), long_examples(vocab));
    let reqs = requests();
    // The smallest cache on which inference alone never preempts (the longest request needs
    // 6 blocks of 4 tokens).
    let (blocks, base) = (6..64)
        .find_map(|n| {
            let mut e = engine_with_blocks(dir.path(), CoserveMode::Coserve, n);
            let out = run(&mut e, &reqs);
            (e.scheduler.num_preemptions == 0).then_some((n, out))
        })
        .unwrap();
    let mut e = engine_with_blocks(dir.path(), CoserveMode::Coserve, blocks);
    let job = job_run(&e, long_examples(vocab));
    e.start_job("ft", job).unwrap();
    // The job takes blocks first; then requests arrive and need them.
    e.step().unwrap();
    assert!(e.scheduler.blocks().num_free() < blocks);
    let got = run(&mut e, &reqs);
    assert_eq!(got, base, "inference changed under KV pressure");
    assert_eq!(
        e.scheduler.num_preemptions, 0,
        "a request was preempted while a job held blocks"
    );
    assert!(
        e.counters.finetune_kv_evictions > 0,
        "the cache ({blocks} blocks) never ran short: the test shows nothing"
    );
    assert_eq!(e.jobs[0].state, JobState::Succeeded);
    // Restarted sequences leave no trace in the gradients.
    let d = adapter_max_abs_diff(&want, &e.jobs[0].run.lora.to_adapter(None).unwrap());
    assert!(d <= 1e-5, "max abs diff {d} from the standalone run");
    assert_eq!(e.scheduler.blocks().num_free(), blocks, "KV blocks leaked");
}

#[test]
fn validation_loss_after_each_epoch_matches_a_full_forward() {
    use tandem_model::{KvCache, LogitsWanted, PackedBatch};
    let t = Tiny::gqa();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 3);
    let vocab = t.vocab as u32;
    let mut e = engine(dir.path(), CoserveMode::Coserve);
    let validation: Vec<_> = tiny_examples(vocab)
        .into_iter()
        .map(|mut x| {
            x.tokens.iter_mut().for_each(|v| *v = (*v * 7 + 3) % vocab);
            x
        })
        .take(3)
        .collect();
    let mut job = job_run(&e, tiny_examples(vocab));
    job.set_validation(validation.clone()).unwrap();
    let epochs = job.cfg.epochs;
    let spe = job.steps_per_epoch();
    e.start_job("ft", job).unwrap();
    let free = e.scheduler.blocks().num_free();
    run(&mut e, &requests());
    let j = &e.jobs[0];
    assert_eq!(j.state, JobState::Succeeded);
    let steps: Vec<usize> = j.run.evals.iter().map(|v| v.step).collect();
    assert_eq!(steps, (1..=epochs).map(|k| k * spe).collect::<Vec<_>>());
    assert_eq!(e.scheduler.blocks().num_free(), free, "KV blocks leaked");
    // The last evaluation is the final adapter's mean NLL over the targets, computed here by a
    // whole-sequence forward with every position's logits.
    let model = &e.runner.model;
    let mut reg = tandem_model::lora::AdapterRegistry::new(
        tandem_model::lora::RegistryConfig::default(),
        &model.cfg,
        &Device::Cpu,
        DType::F32,
    );
    let id = reg
        .register_live("final", j.run.lora.to_adapter(None).unwrap())
        .unwrap();
    let (mut sum, mut count) = (0f64, 0usize);
    for ex in &validation {
        let n = ex.tokens.len();
        let cache = KvCache::new(
            model.cfg.num_hidden_layers,
            4,
            4,
            model.cfg.num_key_value_heads,
            model.cfg.head_dim,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let mut b = PackedBatch::default();
        b.push_with_adapter(
            0,
            &ex.tokens,
            0,
            vec![0, 1, 2, 3],
            LogitsWanted::All,
            Some(id),
        );
        let (logits, _) = model.forward_packed(&b, &cache, Some(&reg), &[]).unwrap();
        let rows = logits
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        for i in 0..n - 1 {
            if ex.target[i + 1] {
                let max = rows[i].iter().cloned().fold(f64::MIN, f64::max);
                let lse = max + rows[i].iter().map(|x| (x - max).exp()).sum::<f64>().ln();
                sum += lse - rows[i][ex.tokens[i + 1] as usize];
                count += 1;
            }
        }
    }
    let want = sum / count as f64;
    let got = j.run.evals.last().unwrap().loss;
    assert!(
        (got - want).abs() <= 1e-5 * want.abs(),
        "validation loss {got}, full forward {want}"
    );
}
