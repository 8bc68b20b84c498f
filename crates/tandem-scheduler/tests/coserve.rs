//! Co-serving on a tiny random model: a finetuning job runs in the same engine iterations as
//! inference requests. In every mode the job trains exactly the adapter that `Finetuner` trains
//! alone on the same data, greedy inference outputs are the same as with no job running, the
//! adapter is served under the job's name while and after it trains, and KV blocks come back.

use candle_core::{DType, Device};
use std::time::Duration;
use tandem_model::finetune::{Finetuner, TrainableLora, TrainingRun};
use tandem_model::testing::{adapter_max_abs_diff, tiny_examples, tiny_train_config, Tiny};
use tandem_model::{load_model, ModelRunner, SamplingParams};
use tandem_scheduler::{CoserveConfig, CoserveMode, JobState, LlmEngine, SchedulerConfig};

fn engine(dir: &std::path::Path, mode: CoserveMode) -> LlmEngine {
    let m = load_model(Some(dir), &Device::Cpu, DType::F32).unwrap();
    let runner = ModelRunner::new(m.model, 64, 4).unwrap();
    let mut e = LlmEngine::new(
        runner,
        m.tokenizer,
        SchedulerConfig {
            max_num_seqs: 8,
            max_batched_tokens: 16,
            block_size: 4,
            num_blocks: 64,
            max_model_len: 512,
            max_loras: 4,
        },
    );
    e.coserve = CoserveConfig {
        mode,
        tpot_slo: Duration::from_millis(5),
        temporal_every: 3,
    };
    e
}

fn requests() -> Vec<(Vec<u32>, SamplingParams)> {
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

/// Runs the engine until it is idle; returns each request's tokens.
fn run(e: &mut LlmEngine, reqs: &[(Vec<u32>, SamplingParams)]) -> Vec<Vec<u32>> {
    let ids: Vec<u64> = reqs
        .iter()
        .map(|(p, s)| e.add_request(p.clone(), s.clone(), None).unwrap())
        .collect();
    let mut out = vec![Vec::new(); reqs.len()];
    let mut steps = 0;
    while e.has_work() {
        steps += 1;
        assert!(steps < 20_000, "engine does not finish");
        for o in e.step().unwrap() {
            let i = ids.iter().position(|&x| x == o.seq_id).unwrap();
            out[i].extend(o.token);
        }
    }
    out
}

#[test]
fn coserved_job_trains_the_standalone_adapter_and_leaves_inference_unchanged() {
    let t = Tiny::gqa();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 3);
    let vocab = t.vocab as u32;
    // The reference: the same run alone.
    let m = load_model(Some(dir.path()), &Device::Cpu, DType::F32).unwrap();
    let mut alone =
        Finetuner::new(&m.model, tiny_examples(vocab), tiny_train_config(), None).unwrap();
    while !alone.is_done() {
        alone.train_step().unwrap();
    }
    let want = alone.adapter().unwrap();
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
