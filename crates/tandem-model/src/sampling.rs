//! Sampling one token from a row of logits: logit bias, end tokens held back before
//! `min_tokens`, repetition / frequency / presence penalties, min-p, then greedy or temperature
//! with top-k and top-p; seeded. A constrained sequence's grammar masks the row last, and
//! advances with each drawn token.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 keeps everything.
    pub top_p: f32,
    /// 0 keeps everything.
    pub top_k: usize,
    /// Same seed, same output; None draws a seed from the OS.
    pub seed: Option<u64>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Return the sampled token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// OpenAI's penalties over the tokens generated so far (-2..=2, 0 = off): a token's logit
    /// loses `presence_penalty` once it has appeared and `frequency_penalty` per appearance.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// vLLM's (and HF's) repetition penalty over prompt and generated tokens (1 = off): such a
    /// token's logit is divided by it when positive, multiplied when negative.
    pub repetition_penalty: f32,
    /// OpenAI's logit_bias: (token, bias) added to the logit before anything else.
    pub logit_bias: Vec<(u32, f32)>,
    /// min-p sampling (0 = off): only tokens at least this fraction as likely as the most
    /// likely one (after temperature) are drawn from.
    pub min_p: f32,
    /// vLLM's: generation also stops at these tokens (as at EOS; they are not output).
    pub stop_token_ids: Vec<u32>,
    /// vLLM's: no EOS or stop token before this many generated tokens.
    pub min_tokens: usize,
    /// The tokens that end generation, set by the engine (EOS and `stop_token_ids`): what
    /// `min_tokens` holds back.
    pub end_token_ids: Vec<u32>,
    /// Structured output: the compiled constraint every drawn token must keep to.
    pub grammar: Option<crate::grammar::Grammar>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            max_tokens: 256,
            stop: vec![],
            ignore_eos: false,
            logprobs: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            min_p: 0.0,
            stop_token_ids: Vec::new(),
            min_tokens: 0,
            end_token_ids: Vec::new(),
            grammar: None,
        }
    }
}

impl SamplingParams {
    /// Checks ranges; the error names the parameter.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens must be >= 1".into());
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be between -2 and 2, got {v}"));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!(
                "repetition_penalty must be a positive number, got {}",
                self.repetition_penalty
            ));
        }
        if let Some((t, b)) = self.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
            return Err(format!("logit_bias of token {t} must be finite, got {b}"));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be between 0 and 1, got {}", self.min_p));
        }
        Ok(())
    }

    /// Whether the logits are changed before sampling (bias, a penalty, min-p, min_tokens).
    pub fn adjusts_logits(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
            || !self.logit_bias.is_empty()
            || self.min_p > 0.0
            || (self.min_tokens > 0 && !self.end_token_ids.is_empty())
    }
}

/// Log-probabilities (of the model's distribution, before temperature) of a sampled token and
/// of the `k` most likely tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// (token, logprob), most likely first.
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    pub fn of(logits: &[f32], token: u32, k: usize) -> Self {
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lse = max as f64
            + logits
                .iter()
                .map(|&x| ((x - max) as f64).exp())
                .sum::<f64>()
                .ln();
        let lp = |i: usize| (logits[i] as f64 - lse) as f32;
        let mut top: Vec<u32> = (0..logits.len() as u32).collect();
        let k = k.min(top.len());
        if k > 0 {
            top.select_nth_unstable_by(k - 1, |&a, &b| {
                logits[b as usize]
                    .total_cmp(&logits[a as usize])
                    .then(a.cmp(&b))
            });
            top.truncate(k);
            top.sort_by(|&a, &b| {
                logits[b as usize]
                    .total_cmp(&logits[a as usize])
                    .then(a.cmp(&b))
            });
        } else {
            top.clear();
        }
        Self {
            token,
            logprob: lp(token as usize),
            top: top.into_iter().map(|t| (t, lp(t as usize))).collect(),
        }
    }
}

/// Per-sequence sampler state: the parameters, the sequence's own random stream and, when the
/// logits are adjusted, the tokens generated so far.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Generated tokens so far and how often each came (kept only when logits are adjusted).
    counts: HashMap<u32, u32>,
    /// The prompt's tokens (kept only with a repetition penalty).
    prompt: HashSet<u32>,
    /// The adjusted row, reused across steps.
    scratch: Vec<f32>,
    /// Where the sequence is in its grammar.
    grammar: Option<crate::grammar::GrammarState>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self::with_prompt(params, &[])
    }

    /// A sampler for a sequence whose prompt is `prompt` (what the repetition penalty counts
    /// besides the generated tokens).
    pub fn with_prompt(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let prompt = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        let grammar = params.grammar.as_ref().map(|g| g.start());
        Self {
            params,
            rng,
            counts: HashMap::new(),
            prompt,
            scratch: Vec::new(),
            grammar,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether `sample` is an argmax and nothing else of the row is wanted (no logprobs).
    pub fn greedy_only(&self) -> bool {
        (self.params.temperature < 1e-5 || self.params.top_k == 1)
            && self.params.logprobs.is_none()
            && !self.params.adjusts_logits()
            && self.grammar.is_none()
    }

    /// Whether the sequence is constrained by a grammar.
    pub fn is_constrained(&self) -> bool {
        self.grammar.is_some()
    }

    /// Computes the grammar's mask for the next draw ahead of time (the runner does this for the
    /// batch in parallel, beside the forward pass); a no-op without a grammar.
    pub fn prepare(&mut self) {
        if let Some(g) = &mut self.grammar {
            g.prepare();
        }
    }

    /// `logits` with the logit bias and the penalties applied (in that order, as vLLM), for
    /// the tokens generated so far; end tokens held back before `min_tokens`; then min-p.
    pub fn adjust(&self, logits: &mut [f32]) {
        let p = &self.params;
        let generated: u32 = self.counts.values().sum();
        if (generated as usize) < p.min_tokens {
            for &t in &p.end_token_ids {
                if let Some(x) = logits.get_mut(t as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        for &(t, b) in &p.logit_bias {
            if let Some(x) = logits.get_mut(t as usize) {
                *x += b;
            }
        }
        let rp = p.repetition_penalty;
        if rp != 1.0 {
            let seen = self
                .prompt
                .iter()
                .chain(self.counts.keys().filter(|t| !self.prompt.contains(t)));
            for &t in seen {
                if let Some(x) = logits.get_mut(t as usize) {
                    *x = if *x > 0.0 { *x / rp } else { *x * rp };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.counts {
                if let Some(x) = logits.get_mut(t as usize) {
                    *x -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        // min-p: p_i / p_max = exp((l_i - l_max) / T) >= min_p (greedy keeps the max anyway).
        if p.min_p > 0.0 && p.temperature >= 1e-5 {
            let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let floor = max + p.temperature * p.min_p.ln();
            logits
                .iter_mut()
                .filter(|x| **x < floor)
                .for_each(|x| *x = f32::NEG_INFINITY);
        }
    }

    /// Draws the next token from `logits` (one row) after `adjust`, and counts it as generated.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let adjusts = self.params.adjusts_logits();
        if !adjusts && self.grammar.is_none() {
            return self.draw(logits);
        }
        let mut row = std::mem::take(&mut self.scratch);
        row.clear();
        row.extend_from_slice(logits);
        if adjusts {
            self.adjust(&mut row);
        }
        if let Some(g) = &mut self.grammar {
            g.apply(&mut row);
            if !row.iter().any(|x| x.is_finite()) {
                // The adjustments (min_tokens holding back the end tokens the grammar asks
                // for, a -100 bias) left nothing the grammar allows: the grammar wins.
                row.clear();
                row.extend_from_slice(logits);
                g.apply(&mut row);
            }
        }
        let tok = self.draw(&row);
        self.scratch = row;
        if let Some(g) = &mut self.grammar {
            g.advance(tok);
        }
        if adjusts {
            *self.counts.entry(tok).or_insert(0) += 1;
        }
        tok
    }

    /// Draws a token from `logits` (one row) as they are. Without top-k/top-p the whole vocabulary is
    /// drawn from in token order (no sort); with them only the candidates are ordered: the
    /// top-k by selection, the top-p nucleus by sorting ever larger heads of the ranking until
    /// it is covered — the same candidates and probabilities as a full sort, at a fraction of
    /// its cost on 50k-250k-token vocabularies.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature < 1e-5 || p.top_k == 1 || logits.len() < 2 {
            return argmax(logits);
        }
        let n = logits.len();
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let temp = p.temperature;
        let weight = |i: u32| (((logits[i as usize] - max) / temp) as f64).exp();
        // Ranking: by logit, descending; ties by id, so results are reproducible.
        let rank = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let k = if p.top_k > 0 && p.top_k < n {
            p.top_k
        } else {
            n
        };
        let top_p = p.top_p as f64;
        if k == n && top_p >= 1.0 {
            let total: f64 = (0..n as u32).map(weight).sum();
            let r = self.rng.random::<f64>() * total;
            return draw((0..n as u32).map(|i| (i, weight(i))), r)
                .unwrap_or_else(|| argmax(logits));
        }
        let mut idx: Vec<u32> = (0..n as u32).collect();
        if k < n {
            idx.select_nth_unstable_by(k - 1, rank);
            idx.truncate(k);
        }
        // Probabilities are normalised over the top-k candidates (all tokens without top-k).
        let denom: f64 = idx.iter().map(|&i| weight(i)).sum();
        let keep = if top_p >= 1.0 {
            idx.sort_unstable_by(rank);
            k
        } else {
            let mut m = 64.min(k);
            loop {
                if m < idx.len() {
                    idx.select_nth_unstable_by(m - 1, rank);
                }
                idx[..m].sort_unstable_by(rank);
                let mut acc = 0.0;
                let covered = idx[..m].iter().position(|&i| {
                    acc += weight(i) / denom;
                    acc >= top_p
                });
                match covered {
                    Some(pos) => break pos + 1,
                    None if m == k => break k,
                    None => m = (2 * m).min(k),
                }
            }
        };
        let head = &idx[..keep];
        let total: f64 = head.iter().map(|&i| weight(i)).sum();
        let r = self.rng.random::<f64>() * total;
        draw(head.iter().map(|&i| (i, weight(i))), r).unwrap_or(head[keep - 1])
    }
}

/// The first candidate at which the running sum of weights passes `r` (None if rounding left
/// `r` at or above the total).
fn draw(candidates: impl Iterator<Item = (u32, f64)>, mut r: f64) -> Option<u32> {
    for (i, w) in candidates {
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

/// Index of the largest value (ties: the first).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: Some(seed),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_largest() {
        let mut s = Sampler::new(params(0.0, 1.0, 0, 1));
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 1.0, 0, seed));
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0, 4.0, 0.0, -1.0, -2.0];
        let mut k = Sampler::new(params(2.0, 1.0, 2, 3));
        assert!((0..500).all(|_| k.sample(&logits) < 2));
        // p(0) = 0.73 at temperature 1: top_p 0.5 keeps only token 0.
        let mut p = Sampler::new(params(1.0, 0.5, 0, 3));
        assert!((0..500).all(|_| p.sample(&logits) == 0));
    }

    /// The nucleus by a full sort, as the definition reads: the smallest prefix of the ranking
    /// (logit descending, ties by id) whose probability reaches top_p, within the top k.
    fn reference_nucleus(logits: &[f32], t: f32, top_p: f64, top_k: usize) -> Vec<u32> {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if top_k > 0 {
            idx.truncate(top_k);
        }
        let max = logits[idx[0] as usize];
        let w: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i as usize] - max) / t) as f64).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let mut acc = 0.0;
        for (n, x) in w.iter().enumerate() {
            acc += x / total;
            if acc >= top_p {
                idx.truncate(n + 1);
                break;
            }
        }
        idx
    }

    #[test]
    fn large_vocabularies_draw_from_exactly_the_nucleus() {
        // 1500 tokens, nearly flat (the nucleus needs many doublings of the sorted head), with
        // tied logits across the boundary.
        let logits: Vec<f32> = (0..1500u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 20) % 97) as f32 * 0.01)
            .collect();
        for (top_p, top_k) in [(0.5f32, 0usize), (0.9, 0), (0.3, 400), (1.0, 40)] {
            let want = reference_nucleus(&logits, 0.8, top_p as f64, top_k);
            let inside: std::collections::HashSet<u32> = want.iter().copied().collect();
            let mut s = Sampler::new(params(0.8, top_p, top_k, 5));
            let mut seen = std::collections::HashSet::new();
            for _ in 0..8 * want.len() {
                let tok = s.sample(&logits);
                assert!(
                    inside.contains(&tok),
                    "top_p {top_p} top_k {top_k}: {tok} is outside"
                );
                seen.insert(tok);
            }
            assert!(
                seen.len() * 100 >= want.len() * 98,
                "top_p {top_p} top_k {top_k}: drew {} of {}",
                seen.len(),
                want.len()
            );
        }
    }

    /// The adjustments as the definitions read, in float64: bias, then the repetition penalty
    /// over prompt and output tokens, then frequency and presence over output tokens.
    fn reference_adjust(
        logits: &[f32],
        p: &SamplingParams,
        prompt: &[u32],
        out: &[u32],
    ) -> Vec<f64> {
        let mut x: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
        for &(t, b) in &p.logit_bias {
            x[t as usize] += b as f64;
        }
        let rp = p.repetition_penalty as f64;
        for t in 0..x.len() as u32 {
            if prompt.contains(&t) || out.contains(&t) {
                let v = &mut x[t as usize];
                *v = if *v > 0.0 { *v / rp } else { *v * rp };
            }
            let n = out.iter().filter(|&&o| o == t).count() as f64;
            if n > 0.0 {
                x[t as usize] -= p.presence_penalty as f64 + p.frequency_penalty as f64 * n;
            }
        }
        x
    }

    #[test]
    fn penalties_and_bias_change_the_logits_as_defined() {
        let logits: Vec<f32> = (0..40)
            .map(|i| ((i * 29) % 17) as f32 * 0.37 - 2.5)
            .collect();
        let prompt = [3u32, 7, 7, 11, 30];
        for (presence, frequency, repetition, bias) in [
            (0.5f32, 0.0f32, 1.0f32, vec![]),
            (0.0, 0.8, 1.0, vec![]),
            (-0.4, 1.1, 1.3, vec![(5u32, 2.5f32), (9, -100.0)]),
            (0.2, -0.3, 0.7, vec![(0, 1.0)]),
        ] {
            let p = SamplingParams {
                temperature: 0.0,
                presence_penalty: presence,
                frequency_penalty: frequency,
                repetition_penalty: repetition,
                logit_bias: bias,
                ..Default::default()
            };
            let mut s = Sampler::with_prompt(p.clone(), &prompt);
            let mut out = Vec::new();
            for _ in 0..25 {
                let want = reference_adjust(&logits, &p, &prompt, &out);
                let mut got = logits.clone();
                s.adjust(&mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w} ({p:?})");
                }
                // Greedy after the adjustment: the reference's argmax (first on ties).
                let best =
                    (0..want.len()).fold(0, |b, i| if want[i] > want[b] { i } else { b }) as u32;
                let tok = s.sample(&logits);
                assert_eq!(tok, best, "{p:?} after {out:?}");
                out.push(tok);
            }
            // A positive frequency penalty must have made greedy decoding move on.
            if frequency > 0.0 {
                assert!(out.iter().any(|&t| t != out[0]), "{out:?}");
            }
        }
    }

    #[test]
    fn min_p_and_min_tokens_restrict_the_draws() {
        // At temperature 1, p1/p0 = e^-0.5 = 0.61, p2/p0 = e^-3 = 0.05: min_p 0.1 keeps 0 and 1.
        let logits = [3.0f32, 2.5, 0.0, -1.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            min_p: 0.1,
            seed: Some(3),
            ..Default::default()
        });
        let draws: Vec<u32> = (0..400).map(|_| s.sample(&logits)).collect();
        assert!(draws.iter().all(|&t| t < 2), "{draws:?}");
        assert!(draws.contains(&0) && draws.contains(&1));
        // Token 0 ends generation and is the argmax: held back for the first 3 tokens only.
        let mut g = Sampler::new(SamplingParams {
            min_tokens: 3,
            end_token_ids: vec![0],
            ..Default::default()
        });
        let out: Vec<u32> = (0..5).map(|_| g.sample(&logits)).collect();
        assert_eq!(out, [1, 1, 1, 0, 0]);
    }

    #[test]
    fn without_adjustments_the_sampler_keeps_no_history() {
        let mut s = Sampler::with_prompt(params(1.0, 1.0, 0, 1), &[1, 2, 3]);
        assert!(!s.greedy_only() && s.prompt.is_empty());
        s.sample(&[0.0, 1.0, 2.0]);
        assert!(s.counts.is_empty());
        let with = SamplingParams {
            frequency_penalty: 0.5,
            ..Default::default()
        };
        assert!(!Sampler::new(with).greedy_only());
    }

    #[test]
    fn temperature_sampling_follows_softmax() {
        // Two tokens with logit gap ln(3): probabilities 0.75 / 0.25.
        let logits = [3f32.ln(), 0.0];
        let mut s = Sampler::new(params(1.0, 1.0, 0, 11));
        let n = 20_000;
        let zeros = (0..n).filter(|_| s.sample(&logits) == 0).count();
        let frac = zeros as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.015, "{frac}");
    }
}
