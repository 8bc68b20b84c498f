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

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature < 1e-5 || p.top_k == 1 {
            return crate::llama::argmax(logits);
        }
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        // Sort candidates by logit, descending; ties by id so that results are reproducible.
        idx.sort_unstable_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.truncate(p.top_k);
        }
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i as usize] - max) / p.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= total);
        }
        let mut r: f64 = self.rng.random();
        for (i, q) in probs.iter().enumerate() {
            if r < *q {
                return idx[i];
            }
            r -= q;
        }
        idx[probs.len() - 1]
    }
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
