//! AdamW on the LoRA parameters (PyTorch's `torch.optim.AdamW` update, with bias correction and
//! decoupled weight decay), global-norm gradient clipping (`clip_grad_norm_`), and the learning
//! rate schedules of HF transformers (constant, linear and cosine, with linear warmup).
//! Optimizer state lives on the parameters' device.

use crate::error::{ModelError, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "constant" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            _ => Err(format!("unknown schedule `{s}` (constant, linear, cosine)")),
        }
    }
}

/// The learning-rate multiplier at optimizer step `step` (0-based) of `total`, after
/// `warmup` steps of linear warmup (HF's get_{constant,linear,cosine}_schedule_with_warmup).
pub fn lr_factor(schedule: Schedule, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => (1.0 - progress).max(0.0),
        Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Optimizer steps taken.
    pub step: usize,
    /// Per parameter name: (first moment, second moment).
    state: HashMap<String, (Tensor, Tensor)>,
}

/// What one optimizer step saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        Self {
            cfg,
            step: 0,
            state: HashMap::new(),
        }
    }

    /// One update of `params` with `grads` (same names), at learning rate `lr`.
    pub fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &HashMap<String, Tensor>,
        lr: f64,
    ) -> Result<StepInfo> {
        let mut sq = 0f64;
        for (name, _) in params {
            let g = grads
                .get(name)
                .ok_or_else(|| ModelError::Batch(format!("no gradient for `{name}`")))?;
            sq += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        let grad_norm = sq.sqrt();
        let clip = if self.cfg.max_grad_norm > 0.0 {
            (self.cfg.max_grad_norm / (grad_norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (name, p) in params {
            let g = (grads[name].to_dtype(DType::F32)? * clip)?;
            let (m, v) = match self.state.remove(name) {
                Some(s) => s,
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            let m = ((m * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let decayed = (p.as_tensor() * (1.0 - lr * self.cfg.weight_decay))?;
            let denom = ((&v / bc2)?.sqrt()? + self.cfg.eps)?;
            let update = ((&m / bc1)? / denom)?;
            p.set(&(decayed - (update * lr)?)?)?;
            self.state.insert(name.clone(), (m, v));
        }
        Ok(StepInfo { grad_norm, lr })
    }

    /// The state as named tensors (`{name}.exp_avg`, `{name}.exp_avg_sq`), for checkpoints.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, (m, v)) in &self.state {
            out.insert(format!("{name}.exp_avg"), m.clone());
            out.insert(format!("{name}.exp_avg_sq"), v.clone());
        }
        out
    }

    /// Restores what `state_tensors` gave, after `step` optimizer steps.
    pub fn restore(&mut self, step: usize, tensors: HashMap<String, Tensor>) -> Result<()> {
        self.step = step;
        self.state.clear();
        let mut firsts = HashMap::new();
        let mut seconds = HashMap::new();
        for (k, t) in tensors {
            if let Some(n) = k.strip_suffix(".exp_avg_sq") {
                seconds.insert(n.to_string(), t);
            } else if let Some(n) = k.strip_suffix(".exp_avg") {
                firsts.insert(n.to_string(), t);
            }
        }
        for (n, m) in firsts {
            let v = seconds.remove(&n).ok_or_else(|| {
                ModelError::Batch(format!("optimizer state: `{n}.exp_avg_sq` is missing"))
            })?;
            self.state.insert(n, (m, v));
        }
        Ok(())
    }
}
