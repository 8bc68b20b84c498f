//! DPO through the token-level path against candle autograd on the whole DPO loss: the LoRA
//! gradients of a batch of preference pairs (reference passes, chunked policy forwards,
//! deferred weights, (layer, chunk) backward steps) equal autograd over the unchunked policy
//! and reference log-probabilities of both sequences, for chunk sizes 1, 3, 7 and whole, with
//! pairs of different lengths that share their prompts; against the base model and against a
//! frozen starting adapter as the reference. Then a DPO run learns: the preferred answers'
//! margin over the others rises on the pairs.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use tandem_model::finetune::{
    DpoPair, Example, Finetuner, GradAccum, LayerLora, Method, Pair, TrainConfig, TrainableLora,
    Unit,
};
use tandem_model::testing::Tiny;
use tandem_model::Llama;

mod common;
use common::*;

const BETA: f64 = 0.5;

/// Pairs: a shared prompt (not a target) and two answers of different lengths.
fn pairs(vocab: u32) -> Vec<Pair> {
    let ex = Example::with_prompt;
    let t = |k: u32, n: u32| {
        (0..n)
            .map(|i| (i * 7 + 3 + k * 13) % vocab)
            .collect::<Vec<_>>()
    };
    let (p1, p2) = (t(0, 5), t(1, 3));
    vec![
        Pair {
            chosen: ex(&p1, &t(2, 6)),
            rejected: ex(&p1, &t(3, 3)),
        },
        Pair {
            chosen: ex(&p2, &t(4, 2)),
            rejected: ex(&p2, &t(5, 7)),
        },
    ]
}

/// Σ log p of the example's targets through `layers`, unchunked, differentiable.
fn logp(m: &Llama, layers: &[LayerLora], ex: &Example) -> Tensor {
    let mut x = m.embed(&ex.tokens).unwrap();
    for (l, lora) in layers.iter().enumerate() {
        x = m.layer_chunk(l, &x, 0, None, None, lora).unwrap().0;
    }
    let (nll, _) = m
        .head_nll(&x, &labels(&ex.tokens, &ex.target))
        .unwrap()
        .unwrap();
    nll.neg().unwrap()
}

/// candle autograd on the batch's mean DPO loss; the reference (`None`: the base model) is
/// computed without gradients.
fn reference_grads(
    m: &Llama,
    l: &TrainableLora,
    frozen: Option<&TrainableLora>,
    data: &[Pair],
) -> (HashMap<String, Tensor>, f64) {
    let base: Vec<LayerLora> = (0..m.cfg.num_hidden_layers)
        .map(|_| LayerLora::default())
        .collect();
    let ref_layers = frozen.map_or(&base[..], |f| &f.layers[..]);
    let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for p in data {
        let rho = |e: &Example| logp(m, ref_layers, e).detach();
        let z = ((logp(m, &l.layers, &p.chosen) - rho(&p.chosen)).unwrap()
            - (logp(m, &l.layers, &p.rejected) - rho(&p.rejected)).unwrap())
        .unwrap();
        let z = (z * BETA).unwrap();
        // -log σ(z) = log(1 + e^-z)
        let pair = ((z.neg().unwrap().exp().unwrap() + 1.0).unwrap())
            .log()
            .unwrap();
        loss = (loss + pair).unwrap();
    }
    let loss = (loss / data.len() as f64).unwrap();
    let value = loss.to_scalar::<f32>().unwrap() as f64;
    let grads = loss.backward().unwrap();
    let g = l
        .named_params()
        .into_iter()
        .map(|(n, v)| (n, grads.get(v.as_tensor()).unwrap().clone()))
        .collect();
    (g, value)
}

/// The token-level path: each pair a `Unit` (reference passes through the frozen adapter or
/// none, then the policy forwards, `chunk` tokens at a time), then its backward steps.
fn token_level(
    m: &Llama,
    l: &TrainableLora,
    frozen: Option<&TrainableLora>,
    data: &[Pair],
    chunk: usize,
) -> (HashMap<String, Tensor>, f64) {
    let (cache, mut reg) = cache_and_registry(m, 64, 2);
    let train = reg
        .register_live("train", l.to_adapter(None).unwrap())
        .unwrap();
    let reference = frozen.map(|f| {
        reg.register_live("ref", f.to_adapter(None).unwrap())
            .unwrap()
    });
    let mut acc = GradAccum::default();
    let mut loss = 0.0;
    for (k, p) in data.iter().enumerate() {
        let table: Vec<u32> = (k as u32 * 20..k as u32 * 20 + 20).collect();
        let method = Method::Dpo { beta: BETA };
        let mut unit = Unit::new(
            &[&p.chosen, &p.rejected],
            method,
            chunk,
            0.0,
            data.len(),
            &[],
            4,
            false,
        );
        assert!(unit.kv_len() <= table.len() * 4);
        run_forwards(m, &cache, &reg, &mut unit, &table, train, reference);
        assert!(unit.forwards_done() && unit.backward_due());
        loss += unit.dpo.unwrap().loss;
        while unit.backward_due() {
            unit.backward_step(m, &cache, &table, l, &mut acc).unwrap();
        }
    }
    (acc.grads, loss / data.len() as f64)
}

#[test]
fn dpo_gradients_equal_autograd_on_the_whole_loss() {
    for t in [Tiny::gqa(), Tiny::tied_mha()] {
        let (_dir, m) = model(&t);
        let l = lora(&m, 1);
        let start = lora(&m, 5);
        let data = pairs(t.vocab as u32);
        for frozen in [None, Some(&start)] {
            let (want, want_loss) = reference_grads(&m, &l, frozen, &data);
            let longest = data
                .iter()
                .map(|p| p.chosen.tokens.len().max(p.rejected.tokens.len()))
                .max()
                .unwrap();
            for chunk in [1, 3, 7, longest] {
                let (got, loss) = token_level(&m, &l, frozen, &data, chunk);
                let err = max_rel_err(&got, &want);
                assert!(
                    err <= 1e-4,
                    "{} reference, chunk {chunk}: max rel err {err}",
                    if frozen.is_some() { "adapter" } else { "base" }
                );
                assert!(
                    (loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
                    "loss {loss} vs {want_loss}"
                );
            }
        }
    }
}

#[test]
fn dpo_pair_terms_match_the_closed_form() {
    // z = β((πc - ρc) - (πr - ρr)) = 0.5 * ((-3 + 4) - (-5 + 4.5)) = 0.75
    let p = DpoPair::new(0.5, (-3.0, -5.0), (-4.0, -4.5), 4);
    let z: f64 = 0.75;
    assert!((p.loss - (1.0 + (-z).exp()).ln()).abs() < 1e-12);
    let s = 1.0 / (1.0 + z.exp());
    assert!((p.chosen_weight - 0.5 * s / 4.0).abs() < 1e-12);
    assert!((p.rejected_weight + 0.5 * s / 4.0).abs() < 1e-12);
    assert!((p.margin() - z).abs() < 1e-12);
    // Far out either way, finite.
    for z in [-800.0, 800.0] {
        let p = DpoPair::new(1.0, (z, 0.0), (0.0, 0.0), 1);
        assert!(p.loss.is_finite() && p.chosen_weight.is_finite());
    }
}

/// Rank 4, alpha 8, lr 5e-3: a DPO run on the tiny model that moves in a few steps.
fn small_dpo(beta: f64) -> TrainConfig {
    TrainConfig {
        r: 4,
        alpha: 8.0,
        lr: 5e-3,
        method: Method::Dpo { beta },
        ..Default::default()
    }
}

/// A DPO run from the base model raises the preferred answers' margin: the reward accuracy
/// and margin of its steps go up and the mean DPO loss falls below log 2 (its value at the
/// start, where policy = reference).
#[test]
fn a_dpo_run_learns_the_preference() {
    let t = Tiny::gqa();
    let (_dir, m) = model(&t);
    let data = pairs(t.vocab as u32);
    let cfg = TrainConfig {
        epochs: 15,
        batch_size: 2,
        chunk_tokens: 4,
        shuffle: false,
        ..small_dpo(0.1)
    };
    let mut ft = Finetuner::new(&m, data.clone(), cfg, None).unwrap();
    let mut reports = Vec::new();
    while !ft.is_done() {
        reports.push(ft.train_step().unwrap());
    }
    let first = reports[0].dpo.unwrap();
    assert!(
        (first.loss() - std::f64::consts::LN_2).abs() < 1e-4,
        "first loss {}",
        first.loss()
    );
    assert!(first.reward_margin().abs() < 1e-4);
    let last = reports.last().unwrap().dpo.unwrap();
    assert!(last.loss() < 0.6, "last loss {}", last.loss());
    assert_eq!(last.reward_accuracy(), 1.0);
    assert!(
        last.reward_margin() > 0.2,
        "margin {}",
        last.reward_margin()
    );
    // Supervised data is refused for DPO, and the other way round.
    let sup = vec![data[0].chosen.clone()];
    let dpo_cfg = TrainConfig {
        method: Method::Dpo { beta: 0.1 },
        ..Default::default()
    };
    assert!(Finetuner::new(&m, sup, dpo_cfg, None).is_err());
    assert!(Finetuner::new(&m, data, TrainConfig::default(), None).is_err());
}

/// A DPO run checkpointed and resumed continues exactly as a straight run (the reference
/// log-probabilities, not checkpointed, are computed again and equal), against the base model
/// and against a frozen starting adapter.
#[test]
fn a_resumed_dpo_run_equals_a_straight_run() {
    let t = Tiny::gqa();
    let (_dir, m) = model(&t);
    let data = pairs(t.vocab as u32);
    let cfg = TrainConfig {
        epochs: 3,
        batch_size: 1,
        chunk_tokens: 3,
        ..small_dpo(0.3)
    };
    let start = lora(&m, 7).to_adapter(None).unwrap();
    for init in [None, Some(&start)] {
        let new = || match init {
            Some(a) => Finetuner::from_adapter(&m, data.clone(), cfg.clone(), a, None).unwrap(),
            None => Finetuner::new(&m, data.clone(), cfg.clone(), None).unwrap(),
        };
        let mut straight = new();
        let mut losses = Vec::new();
        while !straight.is_done() {
            losses.push(straight.train_step().unwrap().loss);
        }
        assert_eq!(losses.len(), 6);
        let mut first = new();
        for _ in 0..3 {
            first.train_step().unwrap();
        }
        let ck = tempfile::tempdir().unwrap();
        let ck = ck.path().join("checkpoint-3");
        first.save_checkpoint(&ck).unwrap();
        drop(first);
        let mut resumed = Finetuner::resume(&m, data.clone(), &ck, init).unwrap();
        let mut rest = Vec::new();
        while !resumed.is_done() {
            rest.push(resumed.train_step().unwrap().loss);
        }
        for (a, b) in rest.iter().zip(&losses[3..]) {
            assert!((a - b).abs() < 1e-9, "loss after resume {a} vs {b}");
        }
        let d = tandem_model::testing::adapter_max_abs_diff(
            &straight.adapter().unwrap(),
            &resumed.adapter().unwrap(),
        );
        assert!(d <= 1e-6, "resumed vs straight: {d}");
        // Resumed against the wrong reference, the losses differ: the reference matters.
        if init.is_some() {
            let mut wrong = Finetuner::resume(&m, data.clone(), &ck, None).unwrap();
            let l = wrong.train_step().unwrap().loss;
            assert!(
                (l - losses[3]).abs() > 1e-6,
                "the reference made no difference"
            );
        }
    }
}
