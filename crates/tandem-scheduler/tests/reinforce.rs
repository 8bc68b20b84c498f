//! Reinforcement jobs co-served: a job's answers are what ordinary requests through its adapter
//! sample (same prompts, sampling parameters and seeds), graded by its grader, never handed out
//! as request outputs; each step trains on them; client requests go ahead of answers still
//! waiting, and running answers leave to clients the iterations whose predicted time would
//! break the TPOT SLO, and their slots and blocks; a cancelled job's answers stop.

use serde_json::json;
use tandem_model::finetune::{
    Method, PromptItem, Prompts, Reinforce, TrainConfig, TrainData, TrainableLora, TrainingRun,
};
use tandem_model::graders::{score_model_request, Grader, ModelCall};
use tandem_model::SamplingParams;
use tandem_scheduler::{CoserveMode, JobState, Scheduler, SchedulerConfig, Sequence};

mod common;
use common::*;

fn grader() -> Grader {
    Grader::parse(
        &json!({"type": "text_similarity", "name": "g", "input": "{{sample.output_text}}",
            "reference": "{{item.ref}}", "evaluation_metric": "fuzzy_match"}),
        "",
    )
    .unwrap()
}

fn prompts(vocab: u32) -> TrainData {
    let items = (0..4u32)
        .map(|k| PromptItem {
            prompt: (0..3 + k).map(|i| (i * 7 + k * 13 + 1) % vocab).collect(),
            item: json!({"ref": format!("w{} w{}", k + 3, k + 9)}),
        })
        .collect();
    TrainData::Prompts(Prompts {
        items,
        grader: grader(),
    })
}

fn run(e: &tandem_scheduler::LlmEngine, group: usize, epochs: usize) -> TrainingRun {
    let cfg = TrainConfig {
        r: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
        lr: 1e-2,
        epochs,
        batch_size: 2,
        chunk_tokens: 5,
        method: Method::Reinforcement(Reinforce {
            group,
            max_tokens: 5,
            ..Default::default()
        }),
        ..Default::default()
    };
    let m = &e.runner.model;
    let lora = TrainableLora::new(&m.cfg, cfg.spec().unwrap(), m.device(), 1).unwrap();
    TrainingRun::new(prompts(m.cfg.vocab_size as u32), cfg, lora).unwrap()
}

struct NoModel;
impl ModelCall for NoModel {
    fn call(
        &self,
        _: &str,
        _: &[(String, String)],
        _: &serde_json::Value,
    ) -> Result<String, String> {
        Err("no model".into())
    }
}

#[test]
fn answers_are_requests_through_the_job_adapter_and_each_step_trains_on_them() {
    let (_t, dir, vocab) = gqa_model();
    let mut e = engine(dir.path(), CoserveMode::Coserve);
    let job = run(&e, 3, 1);
    e.start_job("rl", job).unwrap();
    // A client request beside the job: its outputs are the only ones handed out.
    let user = e
        .add_request(
            vec![5, 6, 7],
            SamplingParams {
                max_tokens: 40,
                ignore_eos: true,
                ..Default::default()
            },
            None,
        )
        .unwrap();
    let mut steps_seen = 0;
    let mut n = 0;
    while !e.jobs[0].state.is_final() {
        for o in e.step().unwrap() {
            assert_eq!(
                o.seq_id, user,
                "an answer was handed out as a request output"
            );
        }
        n += 1;
        assert!(n < 5000, "the job does not finish");
        let j = &e.jobs[0];
        if j.reports.len() > steps_seen {
            steps_seen = j.reports.len();
            let (req, answers, rewards) = j.last_rollouts.clone().unwrap();
            let r = j.reports.last().unwrap();
            let g = r.grpo.unwrap();
            assert_eq!((g.samples, req.samples, req.prompts.len()), (6, 3, 2));
            assert!(answers.iter().all(|a| !a.tokens.is_empty()));
            assert_eq!(
                g.tokens_sampled,
                answers.iter().map(|a| a.tokens.len()).sum::<usize>()
            );
            // The rewards are the grader's on the answers' texts.
            let TrainData::Prompts(p) = prompts(vocab) else {
                unreachable!()
            };
            for (a, rw) in answers.iter().zip(&rewards) {
                let want = p
                    .grader
                    .grade(&a.text, &p.items[a.item].item, &NoModel)
                    .unwrap()
                    .reward;
                assert!((want - rw).abs() < 1e-12);
            }
            if steps_seen == 1 {
                // Before the first step the adapter is the base model (B = 0): the answers are
                // what plain requests with the same prompts, parameters and seeds sample.
                let mut plain = engine(dir.path(), CoserveMode::InferenceOnly);
                let reqs: Vec<(Vec<u32>, SamplingParams)> = req
                    .prompts
                    .iter()
                    .enumerate()
                    .flat_map(|(pi, (_, prompt))| {
                        (0..req.samples).map(move |k| {
                            let params = SamplingParams {
                                max_tokens: req.max_tokens,
                                temperature: req.temperature as f32,
                                seed: Some(req.seed + (pi * req.samples + k) as u64),
                                ..Default::default()
                            };
                            (prompt.clone(), params)
                        })
                    })
                    .collect();
                let want = run_all(&mut plain, &reqs);
                for (a, (toks, text, _)) in answers.iter().zip(&want) {
                    assert_eq!(&a.tokens, toks);
                    assert_eq!(&a.text, text);
                }
            }
        }
    }
    assert_eq!(e.jobs[0].state, JobState::Succeeded);
    assert_eq!(steps_seen, 2);
    let j = &e.jobs[0];
    assert_eq!(j.answers_sampled, 12);
    assert!(j.trained_tokens > 0 && j.reports.iter().all(|r| r.grad_norm > 0.0));
    // The adapter moved off the base model.
    let moved = j.run.lora.named_params().iter().any(|(n, v)| {
        n.contains("lora_B")
            && v.as_tensor()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
    });
    assert!(moved);
}

#[test]
fn a_cancelled_job_stops_its_answers() {
    let (_t, dir, _) = gqa_model();
    let mut e = engine(dir.path(), CoserveMode::Coserve);
    let job = run(&e, 4, 1);
    e.start_job("rl", job).unwrap();
    e.step().unwrap();
    assert!(e.jobs[0].rollouts.is_some() && e.scheduler.has_work());
    e.cancel_job("rl").unwrap();
    assert!(e.jobs[0].rollouts.is_none());
    assert!(
        !e.scheduler.has_work(),
        "answers of a cancelled job still run"
    );
    assert!(!e.has_work());
}

#[test]
fn client_requests_go_ahead_of_waiting_answers() {
    let cfg = SchedulerConfig {
        max_num_seqs: 1,
        max_batched_tokens: 64,
        block_size: 4,
        num_blocks: 64,
        max_model_len: 512,
        max_loras: 4,
        enable_prefix_caching: false,
    };
    let mut s = Scheduler::new(cfg.clone());
    let p = SamplingParams::default();
    for id in 0..3 {
        let mut q = Sequence::new(id, vec![1, 2, 3], p.clone(), None);
        q.background = true;
        s.add(q).unwrap();
    }
    s.add(Sequence::new(9, vec![4, 5], p.clone(), None))
        .unwrap();
    // Only the client's request counts as waiting for the TTFT check.
    assert!(s.longest_wait().is_some());
    let first = s.schedule();
    assert_eq!(first.batch.segments[0].seq_id, 9);
    let mut only_bg = Scheduler::new(cfg);
    let mut q = Sequence::new(0, vec![1], p, None);
    q.background = true;
    only_bg.add(q).unwrap();
    assert_eq!(only_bg.longest_wait(), None);
}

fn cfg(max_num_seqs: usize, num_blocks: usize, block_size: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs,
        max_batched_tokens: 64,
        block_size,
        num_blocks,
        max_model_len: 512,
        max_loras: 4,
        enable_prefix_caching: false,
    }
}

fn background(id: u64, prompt: Vec<u32>) -> Sequence {
    let mut q = Sequence::new(id, prompt, SamplingParams::default(), None);
    q.background = true;
    q
}

fn client(id: u64, prompt: Vec<u32>) -> Sequence {
    Sequence::new(id, prompt, SamplingParams::default(), None)
}

fn planned(b: &tandem_model::ScheduledBatch) -> Vec<u64> {
    b.batch.segments.iter().map(|s| s.seq_id).collect()
}

#[test]
fn running_answers_wait_while_the_tpot_check_refuses_them_beside_clients() {
    let mut s = Scheduler::new(cfg(4, 64, 4));
    s.add(background(0, vec![1, 2, 3])).unwrap();
    // Alone, an answer runs whatever the check says: it is not asked.
    let mut asked = 0;
    let b = s.schedule_within(&mut |_| {
        asked += 1;
        false
    });
    assert_eq!((planned(&b), asked), (vec![0], 0));
    s.update(&[(0, 7)]);
    s.add(client(9, vec![4, 5])).unwrap();
    // Beside a client, the check sees the client's prefill and the answer's decode step.
    let mut seen = Vec::new();
    let b = s.schedule_within(&mut |segs| {
        seen.push(
            segs.iter()
                .map(|c| (c.start, c.len, c.logits))
                .collect::<Vec<_>>(),
        );
        false
    });
    assert_eq!(planned(&b), vec![9]);
    assert_eq!(seen, vec![vec![(0, 2, 1), (3, 1, 1)]]);
    // Held, not preempted: it keeps its blocks and its computed tokens.
    assert_eq!(s.num_running(), 2);
    assert_eq!(s.get(0).unwrap().num_computed, 3);
    assert!(!s.blocks().table(0).is_empty());
    s.update(&[(9, 8)]);
    let b = s.schedule_within(&mut |_| true);
    assert_eq!(planned(&b), vec![9, 0]);
    assert_eq!(s.num_preemptions, 0);
}

#[test]
fn a_client_takes_the_slot_and_the_blocks_of_a_running_answer_never_the_reverse() {
    // Slots: with max_num_seqs 1 a waiting client preempts the running answer.
    let mut s = Scheduler::new(cfg(1, 64, 4));
    s.add(background(0, vec![1, 2, 3])).unwrap();
    s.schedule();
    s.update(&[(0, 7)]);
    s.add(client(9, vec![4, 5])).unwrap();
    assert_eq!(planned(&s.schedule()), vec![9]);
    assert_eq!(
        (s.num_running(), s.num_waiting(), s.num_preemptions),
        (1, 1, 1)
    );
    assert!(s.blocks().table(0).is_empty());
    s.update(&[(9, 8)]);
    s.finish(9);
    // The answer comes back, recomputing its four tokens.
    let b = s.schedule();
    assert_eq!(planned(&b), vec![0]);
    assert_eq!(b.batch.segments[0].len, 4);

    // Blocks (size 2, 7 of them): client A and answer B run, then client C joins. When A
    // needs a block that is not there, B (older than C) is preempted, not C.
    let mut s = Scheduler::new(cfg(4, 7, 2));
    s.add(client(1, vec![1, 2, 3, 4])).unwrap();
    s.add(background(2, vec![5, 6])).unwrap();
    assert_eq!(planned(&s.schedule()), vec![1, 2]);
    s.update(&[(1, 9), (2, 9)]);
    s.add(client(3, vec![7, 8])).unwrap();
    for _ in 0..2 {
        assert_eq!(planned(&s.schedule()), vec![1, 3, 2]);
        s.update(&[(1, 9), (3, 9), (2, 9)]);
    }
    // A's seventh token needs a fourth block; none is free.
    assert_eq!(s.blocks().num_free(), 0);
    assert_eq!(planned(&s.schedule()), vec![1, 3]);
    assert_eq!(s.get(2).unwrap().num_preemptions, 1);
    assert_eq!(s.get(3).unwrap().num_preemptions, 0);
}

#[test]
fn a_running_answer_does_not_shorten_the_clients_latency_budget() {
    let mut s = Scheduler::new(cfg(4, 64, 4));
    s.add(background(0, vec![1, 2, 3])).unwrap();
    s.schedule();
    s.update(&[(0, 7)]);
    assert_eq!(s.latency_budget(std::time::Duration::from_millis(50)), None);
}

/// Client tokens and answer tokens of each iteration while a reinforcement job samples beside
/// three client requests, under a TPOT SLO of `slo`.
fn iterations_beside_clients(slo: std::time::Duration) -> (Vec<(u64, u64)>, JobState) {
    use std::sync::{Arc, Mutex};
    use tandem_scheduler::cost_model::{forward_features, SegmentCost};
    let (_t, dir, vocab) = gqa_model();
    let mut e = engine(dir.path(), CoserveMode::Coserve);
    e.coserve.tpot_slo = slo;
    // Any batch is predicted to take some time from the start.
    let one = SegmentCost {
        start: 0,
        len: 1,
        logits: 1,
    };
    e.cost.forward.observe(&forward_features([one]), 1e-3);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    e.on_iteration = Some(Box::new(move |r| {
        let all = r.decode_tokens + r.prefill_tokens;
        log.lock()
            .unwrap()
            .push((all - r.background_tokens, r.background_tokens));
    }));
    let job = run(&e, 4, 1);
    e.start_job("rl", job).unwrap();
    // The answers start first; then the clients come.
    e.step().unwrap();
    for k in 0..3u32 {
        let p = SamplingParams {
            max_tokens: 12,
            ignore_eos: true,
            ..Default::default()
        };
        e.add_request(vec![1 + k, 2, 3 % vocab], p, None).unwrap();
    }
    let mut n = 0;
    while !e.jobs[0].state.is_final() {
        e.step().unwrap();
        n += 1;
        assert!(n < 5000);
    }
    let v = seen.lock().unwrap().clone();
    (v, e.jobs[0].state.clone())
}

#[test]
fn answers_leave_iterations_whose_predicted_time_breaks_the_tpot_slo_to_clients() {
    // An SLO no batch meets: no iteration runs answers beside client tokens, yet the job ends.
    let (its, state) = iterations_beside_clients(std::time::Duration::from_nanos(1));
    assert_eq!(state, JobState::Succeeded);
    assert!(its.iter().any(|&(c, _)| c > 0) && its.iter().any(|&(_, b)| b > 0));
    let mixed: Vec<_> = its.iter().filter(|&&(c, b)| c > 0 && b > 0).collect();
    // The first iteration (answers only) started them; the clients came after.
    assert!(mixed.is_empty(), "answers ran beside clients: {mixed:?}");
    // An SLO every batch meets: answers and clients share iterations (the check above is not
    // empty).
    let (its, state) = iterations_beside_clients(std::time::Duration::from_secs(3600));
    assert_eq!(state, JobState::Succeeded);
    assert!(its.iter().any(|&(c, b)| c > 0 && b > 0));
}

/// `score_model` through a plain engine, as the grader routes run it.
struct PlainCall(std::cell::RefCell<tandem_scheduler::LlmEngine>);

impl ModelCall for PlainCall {
    fn call(
        &self,
        _model: &str,
        messages: &[(String, String)],
        params: &serde_json::Value,
    ) -> Result<String, String> {
        let mut e = self.0.borrow_mut();
        let (prompt, p) = score_model_request(&e.tokenizer, messages, params)?;
        Ok(run_all(&mut e, &[(prompt, p)]).remove(0).1)
    }
}

#[test]
fn score_model_graders_ask_the_served_model_through_the_engine() {
    let (_t, dir, vocab) = gqa_model();
    // A chat template for the grader's messages (the word-level vocabulary's words).
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        json!({"chat_template": "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}"})
            .to_string(),
    )
    .unwrap();
    let mut e = engine(dir.path(), CoserveMode::Coserve);
    // A multi of a score_model (the base model asked about the answer; the first number of its
    // reply, in [0, 100]) and a text similarity.
    let g = Grader::parse(
        &json!({"type": "multi", "name": "m", "calculate_output": "score / 100 + 0.5 * sim",
            "graders": {
                "score": {"type": "score_model", "name": "score", "model": "base", "range": [0, 100],
                    "sampling_params": {"max_tokens": 3},
                    "input": [{"role": "user", "content": "rate {{sample.output_text}} for {{item.ref}}"}]},
                "sim": {"type": "text_similarity", "name": "sim", "input": "{{sample.output_text}}",
                    "reference": "{{item.ref}}", "evaluation_metric": "fuzzy_match"}}}),
        "",
    )
    .unwrap();
    let mut job = run(&e, 2, 1);
    let TrainData::Prompts(mut p) = prompts(vocab) else {
        unreachable!()
    };
    p.grader = g.clone();
    job = TrainingRun::new(TrainData::Prompts(p.clone()), job.cfg.clone(), job.lora).unwrap();
    e.start_job("rl", job).unwrap();
    let plain = PlainCall(std::cell::RefCell::new(engine(
        dir.path(),
        CoserveMode::InferenceOnly,
    )));
    let mut n = 0;
    let mut checked = 0;
    let mut scored = false;
    while !e.jobs[0].state.is_final() {
        e.step().unwrap();
        n += 1;
        assert!(n < 5000);
        let j = &e.jobs[0];
        if j.reports.len() > checked {
            checked = j.reports.len();
            let (_, answers, rewards) = j.last_rollouts.clone().unwrap();
            for (a, rw) in answers.iter().zip(&rewards) {
                let want = g.grade(&a.text, &p.items[a.item].item, &plain).unwrap();
                scored |= want.sub_rewards["score"] > 0.0;
                assert!(
                    (want.reward - rw).abs() < 1e-12,
                    "{} vs {rw} for {:?}",
                    want.reward,
                    a.text
                );
            }
        }
    }
    assert_eq!(
        e.jobs[0].state,
        JobState::Succeeded,
        "{:?}",
        e.jobs[0].state
    );
    assert_eq!(checked, 2);
    assert!(
        scored,
        "the model's replies never held a number: the check is empty"
    );
}

/// A reinforcement job checkpointed after its second step and resumed in a fresh engine (as
/// after a restart) trains the same adapter as one that ran straight through: the answers are
/// seeded by the step, the optimizer state is restored.
#[test]
fn a_resumed_reinforcement_job_equals_a_straight_one() {
    let (_t, dir, vocab) = gqa_model();
    let finish = |e: &mut tandem_scheduler::LlmEngine| {
        let mut n = 0;
        while !e.jobs[0].state.is_final() {
            e.step().unwrap();
            n += 1;
            assert!(n < 20_000);
        }
        assert_eq!(e.jobs[0].state, JobState::Succeeded);
        e.jobs[0].run.lora.to_adapter(None).unwrap()
    };
    let mut straight = engine(dir.path(), CoserveMode::Coserve);
    let job = run(&straight, 2, 2);
    assert_eq!(job.total_steps(), 4);
    straight.start_job("rl", job).unwrap();
    let want = finish(&mut straight);

    let ck = tempfile::tempdir().unwrap();
    let mut first = engine(dir.path(), CoserveMode::Coserve);
    let job = run(&first, 2, 2);
    first.start_job("rl", job).unwrap();
    first
        .set_job_checkpoints("rl", ck.path().to_path_buf(), 2)
        .unwrap();
    while first.jobs[0].reports.len() < 2 {
        first.step().unwrap();
    }
    drop(first);
    let m = load_model_for(dir.path());
    let (resumed, _) = TrainingRun::resume(
        &ck.path().join("step-2"),
        prompts(vocab),
        &m.cfg,
        m.device(),
    )
    .unwrap();
    assert_eq!(resumed.step, 2);
    // Steps 3 and 4 move the adapter: the equality below is not that of doing nothing.
    let at2 = resumed.lora.to_adapter(None).unwrap();
    assert!(tandem_model::testing::adapter_max_abs_diff(&want, &at2) > 1e-4);
    let mut second = engine(dir.path(), CoserveMode::Coserve);
    second.start_job("rl", resumed).unwrap();
    let got = finish(&mut second);
    let d = tandem_model::testing::adapter_max_abs_diff(&want, &got);
    assert!(d <= 1e-6, "resumed vs straight: {d}");
    // With validation prompts: evaluated before the first step and after each epoch (steps 0,
    // 2, 4); resumed after step 2, a run evaluates after step 4 only.
    let with_validation = |e: &tandem_scheduler::LlmEngine| {
        let mut r = run(e, 2, 2);
        r.set_validation(prompts(vocab)).unwrap();
        r
    };
    let mut full = engine(dir.path(), CoserveMode::Coserve);
    let job = with_validation(&full);
    full.start_job("rl", job).unwrap();
    full.set_job_checkpoints("rl", ck.path().join("v"), 2)
        .unwrap();
    finish(&mut full);
    let steps: Vec<usize> = full.jobs[0].run.evals.iter().map(|e| e.step).collect();
    assert_eq!(steps, vec![0, 2, 4]);
    assert!(full.jobs[0]
        .run
        .evals
        .iter()
        .all(|e| e.grpo.unwrap().samples == 4));
    let (mut again, _) = TrainingRun::resume(
        &ck.path().join("v/step-2"),
        prompts(vocab),
        &m.cfg,
        m.device(),
    )
    .unwrap();
    again.set_validation(prompts(vocab)).unwrap();
    let mut third = engine(dir.path(), CoserveMode::Coserve);
    third.start_job("rl", again).unwrap();
    finish(&mut third);
    let steps: Vec<usize> = third.jobs[0].run.evals.iter().map(|e| e.step).collect();
    assert_eq!(steps, vec![4], "a resumed run evaluates again at resume");
}

fn load_model_for(dir: &std::path::Path) -> tandem_model::Llama {
    tandem_model::load_model(
        Some(dir),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap()
    .model
}
