//! DPO jobs co-served: a preference job trains, between inference tokens, exactly the adapter
//! `Finetuner` trains alone on the same pairs (reference passes and both sequences' forwards
//! placed as ordinary forward chunks, the pair's KV held together), inference outputs stay
//! those of an engine with no job, KV blocks come back; a job that starts from a served
//! adapter starts from its weights and takes it, frozen, as the reference; one from an adapter
//! still training is refused.

use candle_core::{DType, Device};
use tandem_model::finetune::{
    Example, Finetuner, Method, Pair, TrainConfig, TrainableLora, TrainingRun,
};
use tandem_model::load_model;
use tandem_model::lora::LoraAdapter;
use tandem_model::testing::{adapter_max_abs_diff, random_adapter};
use tandem_scheduler::{CoserveMode, JobState};

mod common;
use common::*;

fn pairs(vocab: u32) -> Vec<Pair> {
    let ex = Example::with_prompt;
    let t = |k: u32, n: u32| {
        (0..n)
            .map(|i| (i * 5 + 2 + k * 17) % vocab)
            .collect::<Vec<_>>()
    };
    (0..5u32)
        .map(|k| {
            let p = t(k, 3 + k % 3);
            Pair {
                chosen: ex(&p, &t(k + 10, 4 + k % 2)),
                rejected: ex(&p, &t(k + 20, 6 - k % 3)),
            }
        })
        .collect()
}

fn dpo_config() -> TrainConfig {
    TrainConfig {
        r: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        lr: 1e-2,
        epochs: 2,
        batch_size: 2,
        chunk_tokens: 5,
        seed: 3,
        method: Method::Dpo { beta: 0.2 },
        ..Default::default()
    }
}

/// What `Finetuner` trains alone (from `init` if given, the reference too).
fn standalone(dir: &std::path::Path, data: Vec<Pair>, init: Option<&LoraAdapter>) -> LoraAdapter {
    let m = load_model(Some(dir), &Device::Cpu, DType::F32).unwrap();
    let mut ft = match init {
        Some(a) => Finetuner::from_adapter(&m.model, data, dpo_config(), a, None).unwrap(),
        None => Finetuner::new(&m.model, data, dpo_config(), None).unwrap(),
    };
    while !ft.is_done() {
        ft.train_step().unwrap();
    }
    ft.adapter().unwrap()
}

#[test]
fn a_coserved_dpo_job_trains_the_standalone_adapter() {
    let (_t, dir, vocab) = gqa_model();
    let reqs = requests();
    let base = run(&mut engine(dir.path(), CoserveMode::Coserve), &reqs);
    let want = standalone(dir.path(), pairs(vocab), None);
    for mode in [CoserveMode::Coserve, CoserveMode::FinetuneOnly] {
        let mut e = engine(dir.path(), mode);
        let free = e.scheduler.blocks().num_free();
        let cfg = dpo_config();
        let lora = TrainableLora::new(
            &e.runner.model.cfg,
            cfg.spec().unwrap(),
            &Device::Cpu,
            cfg.seed,
        )
        .unwrap();
        e.start_job("dpo", TrainingRun::new(pairs(vocab), cfg, lora).unwrap())
            .unwrap();
        let got = run(&mut e, &reqs);
        assert_eq!(got, base, "{mode:?}: inference changed while a DPO job ran");
        let j = &e.jobs[0];
        assert_eq!(j.state, JobState::Succeeded, "{mode:?}");
        let d = adapter_max_abs_diff(&want, &j.run.lora.to_adapter(None).unwrap());
        assert!(
            d <= 1e-5,
            "{mode:?}: max abs diff {d} from the standalone run"
        );
        let dpo: Vec<_> = j.reports.iter().map(|r| r.dpo.unwrap()).collect();
        assert_eq!(dpo.len(), 6);
        assert!(dpo.iter().all(|d| d.pairs > 0));
        assert_eq!(e.scheduler.blocks().num_free(), free, "KV blocks leaked");
    }
}

#[test]
fn a_dpo_job_from_a_served_adapter_takes_it_as_start_and_reference() {
    let (t, dir, vocab) = gqa_model();
    let init = random_adapter(
        &t.model_config(),
        4,
        8.0,
        &[tandem_model::lora::Proj::Q, tandem_model::lora::Proj::Down],
        false,
        11,
    );
    let want = standalone(dir.path(), pairs(vocab), Some(&init));
    let mut e = engine(dir.path(), CoserveMode::Coserve);
    let adir = tempfile::tempdir().unwrap();
    init.save(adir.path()).unwrap();
    e.runner.adapters.register("sft", adir.path()).unwrap();
    let id = e.runner.adapters.id("sft").unwrap();
    let start = e.runner.adapters.adapter(id).unwrap();
    let mut cfg = dpo_config();
    let lora =
        TrainableLora::from_adapter(&start, e.runner.model.cfg.num_hidden_layers, &Device::Cpu)
            .unwrap();
    cfg.adopt(&lora.spec);
    e.start_job_with_reference(
        "dpo",
        TrainingRun::new(pairs(vocab), cfg.clone(), lora).unwrap(),
        Some("sft"),
    )
    .unwrap();
    // A job whose reference would be an adapter still training is refused.
    let l2 =
        TrainableLora::from_adapter(&start, e.runner.model.cfg.num_hidden_layers, &Device::Cpu)
            .unwrap();
    let err = e
        .start_job_with_reference(
            "dpo2",
            TrainingRun::new(pairs(vocab), cfg, l2).unwrap(),
            Some("dpo"),
        )
        .unwrap_err();
    assert!(err.contains("still training"), "{err}");
    // The reference stays pinned while the job runs.
    assert!(e.runner.adapters.unregister("sft").is_err());
    run(&mut e, &requests());
    let j = &e.jobs[0];
    assert_eq!(j.state, JobState::Succeeded);
    let d = adapter_max_abs_diff(&want, &j.run.lora.to_adapter(None).unwrap());
    assert!(d <= 1e-5, "max abs diff {d} from the standalone run");
    // Finished: the reference is free again.
    e.runner.adapters.unregister("sft").unwrap();
}
