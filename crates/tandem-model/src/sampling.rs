//! Sampling one token from a row of logits: greedy, temperature, top-k, top-p, seeded.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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
        Ok(())
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

/// Per-sequence sampler state: the parameters and the sequence's own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether `sample` is an argmax and nothing else of the row is wanted (no logprobs).
    pub fn greedy_only(&self) -> bool {
        (self.params.temperature < 1e-5 || self.params.top_k == 1) && self.params.logprobs.is_none()
    }

    /// Draws the next token from `logits` (one row). Without top-k/top-p the whole vocabulary is
    /// drawn from in token order (no sort); with them only the candidates are ordered: the
    /// top-k by selection, the top-p nucleus by sorting ever larger heads of the ranking until
    /// it is covered — the same candidates and probabilities as a full sort, at a fraction of
    /// its cost on 50k-250k-token vocabularies.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature < 1e-5 || p.top_k == 1 || logits.len() < 2 {
            return crate::llama::argmax(logits);
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
                .unwrap_or_else(|| crate::llama::argmax(logits));
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
