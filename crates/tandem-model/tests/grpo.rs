//! GRPO through the token-level path against candle autograd on the whole loss: the LoRA
//! gradients of a batch of sampled answers (advantages, the KL term to a frozen reference,
//! reference passes, chunked policy forwards, per-token weights, (layer, chunk) backward steps)
//! equal autograd over the unchunked per-token log-probabilities, for chunk sizes 1, 3, 7 and
//! whole, with and without the KL term, against the base model and a frozen adapter. Then the
//! advantages and the closed-form weights.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use tandem_model::finetune::grpo::{advantages, kl_k3, token_weights};
use tandem_model::finetune::{Example, GradAccum, LayerLora, TrainableLora, Unit};
use tandem_model::testing::Tiny;
use tandem_model::Llama;

mod common;
use common::*;

/// Sampled answers: (prompt + answer, advantage); two prompts, answers of different lengths.
fn answers(vocab: u32) -> Vec<(Example, f64)> {
    let t = |k: u32, n: u32| {
        (0..n)
            .map(|i| (i * 5 + 2 + k * 11) % vocab)
            .collect::<Vec<_>>()
    };
    let (p1, p2) = (t(0, 4), t(1, 6));
    let rewards = [1.0, 0.0, 0.5, 0.25];
    let adv = advantages(&rewards, 2);
    vec![
        (Example::with_prompt(&p1, &t(2, 5)), adv[0]),
        (Example::with_prompt(&p1, &t(3, 2)), adv[1]),
        (Example::with_prompt(&p2, &t(4, 7)), adv[2]),
        (Example::with_prompt(&p2, &t(5, 3)), adv[3]),
    ]
}

/// log p of each answer token through `layers`, unchunked, differentiable.
fn token_logps(m: &Llama, layers: &[LayerLora], ex: &Example) -> Vec<Tensor> {
    let mut x = m.embed(&ex.tokens).unwrap();
    for (l, lora) in layers.iter().enumerate() {
        x = m.layer_chunk(l, &x, 0, None, None, lora).unwrap().0;
    }
    let all = labels(&ex.tokens, &ex.target);
    (0..all.len())
        .filter(|&i| all[i].is_some())
        .map(|i| {
            let mut one = vec![None; all.len()];
            one[i] = all[i];
            m.head_nll(&x, &one).unwrap().unwrap().0.neg().unwrap()
        })
        .collect()
}

/// candle autograd on `Σ_i 1/(N|o_i|) Σ_t [-A_i l_t + β KL_t]`, the reference detached.
fn reference_grads(
    m: &Llama,
    l: &TrainableLora,
    frozen: Option<&TrainableLora>,
    data: &[(Example, f64)],
    beta: f64,
) -> HashMap<String, Tensor> {
    let base: Vec<LayerLora> = (0..m.cfg.num_hidden_layers)
        .map(|_| LayerLora::default())
        .collect();
    let ref_layers = frozen.map_or(&base[..], |f| &f.layers[..]);
    let n = data.len() as f64;
    let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for (ex, adv) in data {
        let pol = token_logps(m, &l.layers, ex);
        let refs = token_logps(m, ref_layers, ex);
        let o = pol.len() as f64;
        for (lt, rt) in pol.iter().zip(&refs) {
            let d = (rt.detach() - lt).unwrap();
            let kl = ((d.exp().unwrap() - &d).unwrap() - 1.0).unwrap();
            let term = ((lt * -adv).unwrap() + (kl * beta).unwrap()).unwrap();
            loss = (loss + (term / (n * o)).unwrap()).unwrap();
        }
    }
    let grads = loss.backward().unwrap();
    l.named_params()
        .into_iter()
        .map(|(n, v)| (n, grads.get(v.as_tensor()).unwrap().clone()))
        .collect()
}

/// Each answer a `Unit::rollout`: its reference pass (β > 0) through the frozen adapter or
/// none, its policy forward `chunk` tokens at a time, then its backward steps.
fn token_level(
    m: &Llama,
    l: &TrainableLora,
    frozen: Option<&TrainableLora>,
    data: &[(Example, f64)],
    beta: f64,
    chunk: usize,
) -> (HashMap<String, Tensor>, Vec<Option<f64>>) {
    let (cache, mut reg) = cache_and_registry(m, 64, 2);
    let train = reg
        .register_live("train", l.to_adapter(None).unwrap())
        .unwrap();
    let reference = frozen.map(|f| {
        reg.register_live("ref", f.to_adapter(None).unwrap())
            .unwrap()
    });
    let mut acc = GradAccum::default();
    let mut kls = Vec::new();
    for (k, (ex, adv)) in data.iter().enumerate() {
        let table: Vec<u32> = (k as u32 * 10..k as u32 * 10 + 10).collect();
        let mut unit = Unit::rollout(ex, chunk, *adv, data.len(), beta, None, 4);
        run_forwards(m, &cache, &reg, &mut unit, &table, train, reference);
        assert!(unit.forwards_done() && unit.backward_due());
        kls.push(unit.kl);
        while unit.backward_due() {
            unit.backward_step(m, &cache, &table, l, &mut acc).unwrap();
        }
    }
    (acc.grads, kls)
}

#[test]
fn grpo_gradients_equal_autograd_on_the_whole_loss() {
    for t in [Tiny::gqa(), Tiny::tied_mha()] {
        let (_dir, m) = model(&t);
        let l = lora(&m, 2);
        let start = lora(&m, 6);
        let data = answers(t.vocab as u32);
        let longest = data.iter().map(|(e, _)| e.tokens.len()).max().unwrap();
        for (frozen, beta) in [(None, 0.0), (None, 0.3), (Some(&start), 0.3)] {
            let want = reference_grads(&m, &l, frozen, &data, beta);
            for chunk in [1, 3, 7, longest] {
                let (got, kls) = token_level(&m, &l, frozen, &data, beta, chunk);
                let err = max_rel_err(&got, &want);
                assert!(
                    err <= 1e-4,
                    "β {beta}, {} reference, chunk {chunk}: max rel err {err}",
                    if frozen.is_some() { "adapter" } else { "base" }
                );
                // The KL is reported when it is trained (and is positive against another
                // adapter).
                assert!(kls.iter().all(|k| k.is_some() == (beta != 0.0)));
                if frozen.is_some() {
                    assert!(kls.iter().all(|k| k.unwrap() > 0.0));
                }
            }
        }
    }
}

#[test]
fn advantages_and_weights_match_the_closed_form() {
    // Group [1, 0]: mean 0.5, sample std sqrt(0.5).
    let a = advantages(&[1.0, 0.0, 3.0, 3.0, 2.0], 2);
    let s = 0.5f64.sqrt() + 1e-4;
    assert!((a[0] - 0.5 / s).abs() < 1e-12 && (a[1] + 0.5 / s).abs() < 1e-12);
    // An all-equal group teaches nothing; a group of one likewise.
    assert_eq!(&a[2..], &[0.0, 0.0, 0.0]);
    // w_t = (A - β(1 - e^(r - l))) / (N |o|).
    let w = token_weights(0.8, &[-1.0, -2.0], &[-1.5, -1.0], 0.2, 4);
    let want = |l: f64, r: f64| (0.8 - 0.2 * (1.0 - (r - l).exp())) / 8.0;
    assert!((w[0] - want(-1.0, -1.5)).abs() < 1e-9);
    assert!((w[1] - want(-2.0, -1.0)).abs() < 1e-9);
    // Without β the reference is not needed.
    assert_eq!(
        token_weights(0.8, &[-1.0, -2.0], &[], 0.0, 4),
        vec![0.1, 0.1]
    );
    // k3 is zero at equality, positive elsewhere.
    assert_eq!(kl_k3(-1.0, -1.0), 0.0);
    assert!(kl_k3(-1.0, -2.0) > 0.0 && kl_k3(-2.0, -1.0) > 0.0);
}
