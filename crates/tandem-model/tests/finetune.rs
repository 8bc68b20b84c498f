//! Token-level finetuning against candle autograd: the LoRA gradients of the chunked path
//! (packed forward with captured layer inputs, (layer, chunk) backward steps with dK/dV
//! buffers) equal candle autograd over the whole unchunked sequence, for several chunk sizes,
//! for batches of sequences with prompt masking, and with inference segments sharing the
//! forward iterations. AdamW against a float64 hand computation; checkpoint + resume against a
//! straight run.

use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use tandem_model::finetune::{
    lr_factor, AdamW, AdamWConfig, Finetuner, GradAccum, Schedule, SeqPhase, SeqTrain,
    TrainableLora, TrainingRun, Unit,
};
use tandem_model::finetune::{Example, Method};
use tandem_model::lora::Proj;
use tandem_model::testing::{
    adapter_max_abs_diff, random_adapter, tiny_examples, tiny_train_config, Tiny,
};
use tandem_model::{Llama, LogitsWanted, PackedBatch};

mod common;
use common::*;

/// Sequences of different lengths; the first `prompt` tokens of each are not targets.
fn sequences(vocab: u32) -> Vec<(Vec<u32>, Vec<bool>)> {
    [(13usize, 4usize), (6, 2), (9, 0)]
        .iter()
        .enumerate()
        .map(|(k, &(n, prompt))| {
            let toks = (0..n as u32)
                .map(|i| (i * 7 + 3 + k as u32 * 11) % vocab)
                .collect();
            let target = (0..n).map(|i| i > 0 && i >= prompt).collect();
            (toks, target)
        })
        .collect()
}

/// candle autograd over each whole sequence: mean loss over the batch's targets.
fn reference(
    m: &Llama,
    l: &TrainableLora,
    seqs: &[(Vec<u32>, Vec<bool>)],
) -> HashMap<String, Tensor> {
    let total: usize = seqs
        .iter()
        .map(|(_, t)| t.iter().filter(|&&b| b).count())
        .sum();
    let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for (toks, target) in seqs {
        let mut x = m.embed(toks).unwrap();
        for layer in 0..m.cfg.num_hidden_layers {
            x = m
                .layer_chunk(layer, &x, 0, None, None, &l.layers[layer])
                .unwrap()
                .0;
        }
        let (nll, _) = m.head_nll(&x, &labels(toks, target)).unwrap().unwrap();
        loss = (loss + nll).unwrap();
    }
    let grads = (loss / total as f64).unwrap().backward().unwrap();
    l.named_params()
        .into_iter()
        .map(|(n, v)| (n, grads.get(v.as_tensor()).unwrap().clone()))
        .collect()
}

/// The token-level path; with `bystanders`, every forward chunk shares its batch with an
/// inference prefill through another adapter and a base-only decode. `chunk` 0: forward chunks
/// of varying sizes (2, 5, 1, 3, ...), as the co-serving engine cuts them to its latency budget,
/// joined into backward chunks of up to 6 tokens.
fn token_level(
    m: &Llama,
    l: &TrainableLora,
    seqs: &[(Vec<u32>, Vec<bool>)],
    chunk: usize,
    bystanders: bool,
) -> HashMap<String, Tensor> {
    let c = &m.cfg;
    let (cache, mut reg) = cache_and_registry(m, 64, 2);
    let train = reg
        .register_live("train", l.to_adapter(None).unwrap())
        .unwrap();
    let other = reg
        .register_live(
            "other",
            random_adapter(c, 4, 8.0, &[Proj::Q, Proj::Down], false, 9),
        )
        .unwrap();
    let total: usize = seqs
        .iter()
        .map(|(_, t)| t.iter().filter(|&&b| b).count())
        .sum();
    let mut acc = GradAccum::default();
    for (k, (toks, target)) in seqs.iter().enumerate() {
        let table: Vec<u32> = (k as u32 * 10..k as u32 * 10 + 10).collect();
        // chunk 0: forward pieces of 1-5 tokens, joined into backward chunks of up to 6.
        let max = if chunk == 0 { 6 } else { chunk };
        let mut seq = SeqTrain::new(toks.clone(), target, max, 1.0 / total as f64);
        let (mut pa, mut pb) = (0usize, 0usize);
        let sizes = [2, 5, 1, 3];
        let mut n = 0;
        while let Some((ci, start, t)) = seq.next_forward_max(if chunk == 0 {
            sizes[n % sizes.len()]
        } else {
            usize::MAX
        }) {
            n += 1;
            let mut batch = PackedBatch::default();
            let mut at = 0;
            if bystanders {
                let bt: Vec<u32> = (40..52).collect();
                batch.push_with_adapter(100, &[5, 9, 2], pa, bt, LogitsWanted::Last, Some(other));
                pa += 3;
                at = 1;
            }
            batch.push_with_adapter(0, t, start, table.clone(), LogitsWanted::None, Some(train));
            if bystanders {
                batch.push(101, &[7], pb, (52..64).collect(), LogitsWanted::Last);
                pb += 1;
            }
            let (_, mut caps) = m.forward_packed(&batch, &cache, Some(&reg), &[at]).unwrap();
            seq.finish_forward(m, ci, caps.pop().unwrap().inputs)
                .unwrap();
        }
        if chunk == 0 {
            assert!(
                seq.chunks.len() < n && seq.chunks.iter().any(|&(_, len)| len > 5),
                "forward pieces {n} were not joined for the backward: {:?}",
                seq.chunks
            );
        }
        while seq.phase != SeqPhase::Done {
            seq.backward_step(m, &cache, &table, l, &mut acc).unwrap();
        }
    }
    acc.grads
}

/// Both ways of running training's layers: the hand-written CPU layer (`finetune::fused`, the
/// default here) and candle's autograd (what other devices run).
fn both_paths(m: &Llama) -> [(Llama, &'static str); 2] {
    let mut autograd = m.clone();
    autograd.set_autograd_layers(true);
    [
        (m.clone(), "hand-written layer"),
        (autograd, "autograd layer"),
    ]
}

fn check_model(t: Tiny) {
    let (_dir, m) = model(&t);
    for (m, path) in both_paths(&m) {
        check_model_path(&m, &t, path);
    }
}

fn check_model_path(m: &Llama, t: &Tiny, path: &str) {
    let l = lora(m, 1);
    let all = sequences(t.vocab as u32);
    // One sequence with prompt masking, every chunk size; then the batch.
    let one = &all[..1];
    let want = reference(m, &l, one);
    for chunk in [1, 3, 7, one[0].0.len(), 0] {
        let err = max_rel_err(&token_level(m, &l, one, chunk, false), &want);
        assert!(err <= 1e-4, "{path}, chunk {chunk}: max rel err {err}");
    }
    let want = reference(m, &l, &all);
    for chunk in [3, 7] {
        let alone = token_level(m, &l, &all, chunk, false);
        let err = max_rel_err(&alone, &want);
        assert!(
            err <= 1e-4,
            "{path}, batch, chunk {chunk}: max rel err {err}"
        );
        let shared = token_level(m, &l, &all, chunk, true);
        let err = max_rel_err(&shared, &want);
        assert!(
            err <= 1e-4,
            "{path}, batch with inference segments, chunk {chunk}: max rel err {err}"
        );
        let err = max_rel_err(&shared, &alone);
        assert!(
            err <= 1e-5,
            "{path}: inference segments changed the gradients: {err}"
        );
    }
}

/// The head of a training chunk (final norm, LM head, cross-entropy and its gradient): the
/// hand-written CPU head (row blocks, gradient formed in place) gives the candle version's
/// loss, per-token log-probabilities, token accuracy and input gradient.
#[test]
fn the_hand_written_head_equals_the_candle_head() {
    for t in [Tiny::gqa(), Tiny::tied_mha()] {
        let (_dir, m) = model(&t);
        let [(fused, _), (candle, _)] = both_paths(&m);
        let h = m.cfg.hidden_size;
        let x: Vec<f32> = (0..7 * h)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let x = Tensor::from_vec(x, (7, h), &Device::Cpu).unwrap();
        let labels: Vec<Option<u32>> = [None, Some(3), Some(90), None, Some(0), Some(41), Some(3)]
            .into_iter()
            .map(|l| l.map(|v: u32| v % t.vocab as u32))
            .collect();
        let a = fused.head_backward(&x, &labels, 0.3).unwrap();
        let b = candle.head_backward(&x, &labels, 0.3).unwrap();
        assert_eq!((a.targets, a.correct), (b.targets, b.correct));
        assert!((a.loss_sum - b.loss_sum).abs() <= 1e-5 * b.loss_sum.abs());
        for (p, q) in a.logps.iter().zip(&b.logps) {
            assert!((p - q).abs() <= 1e-5 * q.abs().max(1.0), "{p} vs {q}");
        }
        let diff = max_abs(&(&a.d_x - &b.d_x).unwrap());
        assert!(diff <= 1e-5 * max_abs(&b.d_x), "d_x differs by {diff}");
        assert_eq!(
            max_abs(&a.d_x.narrow(0, 0, 1).unwrap()),
            0.0,
            "no label, no gradient"
        );
        let loss = fused.head_loss(&x, &labels).unwrap();
        assert_eq!(loss.logps, a.logps);
        let none = fused.head_backward(&x, &[None; 7], 1.0).unwrap();
        assert_eq!((none.targets, max_abs(&none.d_x)), (0, 0.0));
        let bad = [Some(t.vocab as u32); 7];
        assert!(fused.head_backward(&x, &bad, 1.0).is_err());
        // Several groups of rows in one pass: each group's result is its own pass's.
        let parts = [(&labels[..3], 0.3), (&labels[3..], 0.7)];
        for m in [&fused, &candle] {
            let many = m.head_backward_many(&x, &parts).unwrap();
            let mut at = 0;
            for ((labels, w), got) in parts.iter().zip(&many) {
                let rows = x.narrow(0, at, labels.len()).unwrap();
                let want = m.head_backward(&rows, labels, *w).unwrap();
                assert_eq!((got.targets, got.correct), (want.targets, want.correct));
                assert!((got.loss_sum - want.loss_sum).abs() <= 1e-6 * want.loss_sum.abs());
                let diff = max_abs(&(&got.d_x - &want.d_x).unwrap());
                assert!(diff <= 1e-6 * max_abs(&want.d_x).max(1e-6), "{diff}");
                at += labels.len();
            }
        }
    }
}

#[test]
fn token_level_gradients_equal_autograd_gqa() {
    check_model(Tiny {
        llama3_rope: true,
        ..Tiny::gqa()
    });
}

#[test]
fn token_level_gradients_equal_autograd_tied_embeddings() {
    check_model(Tiny::tied_mha());
}

#[test]
fn token_level_gradients_equal_autograd_qwen2_biases() {
    check_model(Tiny {
        arch: "Qwen2ForCausalLM",
        ..Tiny::gqa()
    });
}

#[test]
fn token_level_gradients_equal_autograd_sliding_window() {
    check_model(Tiny {
        arch: "MistralForCausalLM",
        sliding_window: Some(5),
        llama3_rope: false,
        ..Tiny::gqa()
    });
}

/// Short sequences packed into one unit: their forwards in one packed batch, then one
/// backward step per layer over all their rows (`SeqTrain::packed_backward_step`, attention
/// kept within each sequence). The gradients equal candle autograd over each whole sequence,
/// and the steps over each sequence alone.
fn check_packed(t: Tiny) {
    let (_dir, m) = model(&t);
    for (m, path) in both_paths(&m) {
        check_packed_path(&m, &t, path);
    }
}

fn check_packed_path(m: &Llama, t: &Tiny, path: &str) {
    let m = m.clone();
    let l = lora(&m, 4);
    let seqs = sequences(t.vocab as u32);
    let want = reference(&m, &l, &seqs);
    let total: usize = seqs
        .iter()
        .map(|(_, t)| t.iter().filter(|&&b| b).count())
        .sum();
    let (cache, mut reg) = cache_and_registry(&m, 64, 1);
    let train = reg
        .register_live("train", l.to_adapter(None).unwrap())
        .unwrap();
    let mut members: Vec<SeqTrain> = seqs
        .iter()
        .map(|(toks, target)| SeqTrain::new(toks.clone(), target, 16, 1.0 / total as f64))
        .collect();
    let mut batch = PackedBatch::default();
    for (k, s) in members.iter().enumerate() {
        let (_, start, toks) = s.next_forward().unwrap();
        let table = (k as u32 * 10..k as u32 * 10 + 10).collect();
        batch.push_with_adapter(
            k as u64,
            toks,
            start,
            table,
            LogitsWanted::None,
            Some(train),
        );
    }
    let (_, caps) = m
        .forward_packed(&batch, &cache, Some(&reg), &[0, 1, 2])
        .unwrap();
    for (s, cap) in members.iter_mut().zip(caps) {
        s.finish_forward(&m, 0, cap.inputs).unwrap();
    }
    let mut acc = GradAccum::default();
    let mut steps = 0;
    while members[0].phase != SeqPhase::Done {
        let mut refs: Vec<&mut SeqTrain> = members.iter_mut().collect();
        SeqTrain::packed_backward_step(&mut refs, &m, &l, &mut acc).unwrap();
        steps += 1;
    }
    assert_eq!(steps, m.cfg.num_hidden_layers, "one packed step per layer");
    assert!(members.iter().all(|s| s.phase == SeqPhase::Done));
    let err = max_rel_err(&acc.grads, &want);
    assert!(err <= 1e-4, "{path}: packed vs autograd: max rel err {err}");
    let alone = token_level(&m, &l, &seqs, 16, false);
    let err = max_rel_err(&acc.grads, &alone);
    assert!(
        err <= 1e-5,
        "{path}: packed vs one sequence at a time: {err}"
    );
    // The same unit with its forward graphs kept: no recompute, the same gradients.
    let examples: Vec<Example> = seqs
        .iter()
        .map(|(tokens, target)| Example {
            tokens: tokens.clone(),
            target: target.clone(),
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let mut unit = Unit::new(
        &refs,
        Method::Supervised,
        16,
        1.0 / total as f64,
        1,
        &[],
        4,
        false,
    );
    assert!(unit.can_keep());
    assert!(unit.kept_bytes(&m.cfg) > 0);
    unit.forward_kept(&m, &l).unwrap();
    assert!(!unit.can_keep(), "a unit's forward runs once");
    assert!(unit.held_bytes() > 0);
    let mut kept = GradAccum::default();
    let mut steps = 0;
    while !unit.backward_step(&m, &cache, &[], &l, &mut kept).unwrap() {
        steps += 1;
    }
    assert_eq!(steps + 1, m.cfg.num_hidden_layers, "one step per layer");
    let err = max_rel_err(&kept.grads, &want);
    assert!(
        err <= 1e-4,
        "{path}: kept graphs vs autograd: max rel err {err}"
    );
    let err = max_rel_err(&kept.grads, &acc.grads);
    assert!(
        err <= 1e-5,
        "{path}: kept graphs vs recomputed packed steps: {err}"
    );
    // A sequence of two chunks cannot join a packed step.
    let (toks, target) = &seqs[0];
    let mut long = SeqTrain::new(toks.clone(), target, 8, 1.0);
    while let Some((c, start, toks)) = long.next_forward() {
        let toks = toks.to_vec();
        let mut b = PackedBatch::default();
        let table = (0..10).collect();
        b.push_with_adapter(0, &toks, start, table, LogitsWanted::None, Some(train));
        let (_, mut caps) = m.forward_packed(&b, &cache, Some(&reg), &[0]).unwrap();
        long.finish_forward(&m, c, caps.pop().unwrap().inputs)
            .unwrap();
    }
    assert_eq!(long.chunks.len(), 2);
    assert_eq!(long.packable_layer(), None);
    let mut refs = vec![&mut long];
    assert!(SeqTrain::packed_backward_step(&mut refs, &m, &l, &mut acc).is_err());
}

#[test]
fn packed_backward_steps_equal_autograd() {
    check_packed(Tiny::gqa());
    check_packed(Tiny::tied_mha());
    check_packed(Tiny {
        arch: "MistralForCausalLM",
        sliding_window: Some(5),
        llama3_rope: false,
        ..Tiny::gqa()
    });
}

/// Packing a batch's short examples changes nothing but rounding: a run with packing and one
/// without, from the same start and order, give the same losses and adapter.
#[test]
fn packed_runs_equal_unpacked_runs() {
    let t = Tiny::gqa();
    let (_dir, m) = model(&t);
    let data = tiny_examples(t.vocab as u32);
    // Chunks of 16: batches of three 5-8 token examples make a unit of two and one of one.
    let cfg = tandem_model::finetune::TrainConfig {
        chunk_tokens: 16,
        ..tiny_train_config()
    };
    assert!(cfg.pack);
    let mut probe = TrainingRun::new(
        data.clone(),
        cfg.clone(),
        TrainableLora::new(&m.cfg, cfg.spec().unwrap(), &Device::Cpu, 0).unwrap(),
    )
    .unwrap();
    assert_eq!(
        probe.next_forwards().len(),
        2,
        "the first two examples are one unit"
    );
    // A pack budget above a chunk takes more than a chunk's tokens (each example still one
    // chunk): the batch's three examples are one unit.
    let wide = tandem_model::finetune::TrainConfig {
        pack_tokens: Some(64),
        ..cfg.clone()
    };
    let spec = wide.spec().unwrap();
    let mut probe = TrainingRun::new(
        data.clone(),
        wide,
        TrainableLora::new(&m.cfg, spec, &Device::Cpu, 0).unwrap(),
    )
    .unwrap();
    assert_eq!(probe.next_forwards().len(), 3, "the batch is one unit");
    let run = |pack: bool, keep: bool| {
        let mut f = Finetuner::new(
            &m,
            data.clone(),
            tandem_model::finetune::TrainConfig {
                pack,
                ..cfg.clone()
            },
            None,
        )
        .unwrap();
        if !keep {
            f.keep_budget = 0;
        }
        let mut losses = Vec::new();
        while !f.is_done() {
            let r = f.train_step().unwrap();
            losses.push((r.loss, r.grad_norm, r.tokens, r.targets));
        }
        (losses, f.adapter().unwrap())
    };
    let (unpacked, b) = run(false, false);
    for (name, (packed, a)) in [
        ("packed, recomputed", run(true, false)),
        ("packed, graphs kept", run(true, true)),
        ("one per unit, graphs kept", run(false, true)),
    ] {
        assert_eq!(packed.len(), unpacked.len());
        for (p, u) in packed.iter().zip(&unpacked) {
            assert!(
                (p.0 - u.0).abs() <= 1e-5 * u.0.abs(),
                "{name}: loss {p:?} vs {u:?}"
            );
            assert!(
                (p.1 - u.1).abs() <= 1e-4 * u.1.abs(),
                "{name}: grad norm {p:?} vs {u:?}"
            );
            assert_eq!((p.2, p.3), (u.2, u.3), "{name}");
        }
        let d = adapter_max_abs_diff(&a, &b);
        assert!(d <= 1e-5, "{name} vs unpacked adapters: max abs diff {d}");
    }
}

/// The differentiable layer the backward recomputes is the inference forward: logits through
/// `layer_chunk` over the whole sequence equal the packed forward's.
#[test]
fn recomputed_layers_equal_the_inference_forward() {
    for t in [Tiny::gqa(), Tiny::tied_mha()] {
        let (_dir, m) = model(&t);
        let l = lora(&m, 2);
        let toks: Vec<u32> = (0..11).map(|i| (i * 5 + 1) % t.vocab as u32).collect();
        let mut x = m.embed(&toks).unwrap();
        for layer in 0..m.cfg.num_hidden_layers {
            x = m
                .layer_chunk(layer, &x, 0, None, None, &l.layers[layer])
                .unwrap()
                .0;
        }
        let c = &m.cfg;
        let (cache, mut reg) = cache_and_registry(&m, 8, 1);
        let id = reg.register_live("t", l.to_adapter(None).unwrap()).unwrap();
        let mut b = PackedBatch::default();
        b.push_with_adapter(0, &toks, 0, (0..3).collect(), LogitsWanted::All, Some(id));
        let (_, caps) = m.forward_packed(&b, &cache, Some(&reg), &[0]).unwrap();
        let top = caps[0].inputs.last().unwrap();
        let err = max_abs(&(top - &x).unwrap());
        let scale = max_abs(&x);
        assert!(
            err / scale < 1e-5,
            "recomputed vs packed forward: {}",
            err / scale
        );
        assert_eq!(caps[0].inputs.len(), c.num_hidden_layers + 1);
    }
}

#[test]
fn adamw_step_matches_float64_reference() {
    let cfg = AdamWConfig {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-6,
        weight_decay: 0.1,
        max_grad_norm: 0.5,
    };
    let p0 = [0.5f64, -1.25, 2.0, 0.0];
    let g1 = [0.3f64, -0.4, 0.1, 0.2];
    let g2 = [-0.05f64, 0.02, 0.03, -0.01];
    let var =
        Var::from_tensor(&Tensor::new(&[0.5f32, -1.25, 2.0, 0.0], &Device::Cpu).unwrap()).unwrap();
    let params = vec![("p".to_string(), var.clone())];
    let mut opt = AdamW::new(cfg);
    let (mut p, mut m, mut v) = (p0.to_vec(), [0f64; 4], [0f64; 4]);
    for (t, g) in [g1, g2].iter().enumerate() {
        let grads = HashMap::from([(
            "p".to_string(),
            Tensor::new(&g.map(|x| x as f32), &Device::Cpu).unwrap(),
        )]);
        let lr = 0.01 * lr_factor(Schedule::Linear, t, 0, 4);
        let info = opt.step(&params, &grads, lr).unwrap();
        // By hand: clip to the global norm, decay, moments, bias correction.
        let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((info.grad_norm - norm).abs() < 1e-6);
        let clip = (0.5 / (norm + 1e-6)).min(1.0);
        let step = t as i32 + 1;
        for i in 0..4 {
            let gi = g[i] * clip;
            p[i] *= 1.0 - lr * 0.1;
            m[i] = 0.9 * m[i] + 0.1 * gi;
            v[i] = 0.99 * v[i] + 0.01 * gi * gi;
            let mh = m[i] / (1.0 - 0.9f64.powi(step));
            let vh = v[i] / (1.0 - 0.99f64.powi(step));
            p[i] -= lr * mh / (vh.sqrt() + 1e-6);
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..4 {
            assert!(
                (got[i] as f64 - p[i]).abs() < 1e-6,
                "step {step} p[{i}]: {} vs {}",
                got[i],
                p[i]
            );
        }
    }
    assert_eq!(lr_factor(Schedule::Linear, 1, 0, 4), 0.75);
    assert_eq!(lr_factor(Schedule::Constant, 0, 2, 4), 0.0);
    assert_eq!(lr_factor(Schedule::Constant, 1, 2, 4), 0.5);
    assert!((lr_factor(Schedule::Cosine, 2, 0, 4) - 0.5).abs() < 1e-12);
}

#[test]
fn resumed_run_equals_a_straight_run() {
    let t = Tiny::gqa();
    let (_dir, m) = model(&t);
    let cfg = tiny_train_config();
    let data = tiny_examples(t.vocab as u32);
    let mut straight = Finetuner::new(&m, data.clone(), cfg.clone(), None).unwrap();
    assert_eq!(straight.total_steps(), 6);
    let mut losses = Vec::new();
    while !straight.is_done() {
        losses.push(straight.train_step().unwrap().loss);
    }
    let mut first = Finetuner::new(&m, data.clone(), cfg, None).unwrap();
    for _ in 0..4 {
        first.train_step().unwrap();
    }
    let ck = tempfile::tempdir().unwrap();
    let ck = ck.path().join("checkpoint-4");
    first.save_checkpoint(&ck).unwrap();
    drop(first);
    let mut resumed = Finetuner::resume(&m, data, &ck, None).unwrap();
    assert_eq!(resumed.step(), 4);
    let mut resumed_losses = Vec::new();
    while !resumed.is_done() {
        resumed_losses.push(resumed.train_step().unwrap().loss);
    }
    assert_eq!(resumed_losses.len(), 2);
    for (a, b) in resumed_losses.iter().zip(&losses[4..]) {
        assert!((a - b).abs() < 1e-9, "loss after resume {a} vs {b}");
    }
    let (a, b) = (straight.adapter().unwrap(), resumed.adapter().unwrap());
    let d = adapter_max_abs_diff(&a, &b);
    assert!(d <= 1e-6, "resumed vs straight: max abs diff {d}");
    // Training moved the weights (B starts at zero).
    let moved = a.weights.values().any(|w| {
        w.b.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    });
    assert!(moved);
}
