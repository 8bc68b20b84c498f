//! A trainable LoRA adapter (f32 master weights, PEFT's initialisation and keys) and the
//! gradients accumulated for it. One training sequence's state machine is in `seq.rs`.

use super::step::LayerLora;
use crate::error::{ModelError, Result};
use crate::lora::{LoraAdapter, LoraConfig, LoraWeights, Proj};
use crate::ModelConfig;
use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};

/// The shape of a LoRA adapter to train.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub targets: Vec<Proj>,
    pub use_rslora: bool,
}

/// LoRA weights being trained: f32 master weights as candle `Var`s, per (layer, projection).
pub struct TrainableLora {
    pub spec: LoraSpec,
    pub layers: Vec<LayerLora>,
}

/// PEFT's key for a LoRA weight.
pub fn peft_key(layer: usize, p: Proj, which: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.lora_{which}.weight",
        p.parent(),
        p.name()
    )
}

impl TrainableLora {
    /// PEFT's initialization: A kaiming-uniform (a = √5, i.e. U(±1/√in)), B zero, so that the
    /// adapter starts as the base model.
    pub fn new(cfg: &ModelConfig, spec: LoraSpec, device: &Device, seed: u64) -> Result<Self> {
        if spec.r == 0 {
            return Err(ModelError::Batch("LoRA rank must be at least 1".into()));
        }
        if spec.targets.is_empty() {
            return Err(ModelError::Batch(
                "LoRA needs at least one target module".into(),
            ));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let scale = if spec.use_rslora {
            spec.alpha / (spec.r as f64).sqrt()
        } else {
            spec.alpha / spec.r as f64
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            let mut l = LayerLora::default();
            for &p in &spec.targets {
                let (inp, out) = p.dims(cfg);
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..spec.r * inp)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (spec.r, inp), device)?)?;
                let b = Var::zeros((out, spec.r), DType::F32, device)?;
                l.modules.insert(p, (a, b, scale));
            }
            layers.push(l);
        }
        Ok(Self { spec, layers })
    }

    /// Continues training a saved adapter (all modules of one rank; per-module scales, as
    /// PEFT's `alpha_pattern` gives them, are kept).
    pub fn from_adapter(adapter: &LoraAdapter, num_layers: usize, device: &Device) -> Result<Self> {
        let mut layers: Vec<LayerLora> = (0..num_layers).map(|_| LayerLora::default()).collect();
        let mut targets = Vec::new();
        if adapter.weights.is_empty() {
            return Err(ModelError::Batch("the adapter has no LoRA weights".into()));
        }
        for (&(l, p), w) in &adapter.weights {
            if w.a.dim(0)? != adapter.config.r {
                return Err(ModelError::Batch(format!(
                    "layer {l} {}: rank {} differs from the adapter's r = {} (rank_pattern); training needs one rank for every module",
                    p.name(),
                    w.a.dim(0)?,
                    adapter.config.r
                )));
            }
            if l >= num_layers {
                return Err(ModelError::Batch(format!(
                    "the adapter has weights for layer {l}; the model has {num_layers} layers"
                )));
            }
            let a = Var::from_tensor(&w.a.to_dtype(DType::F32)?.to_device(device)?)?;
            let b = Var::from_tensor(&w.b.to_dtype(DType::F32)?.to_device(device)?)?;
            layers[l].modules.insert(p, (a, b, w.scale));
            if !targets.contains(&p) {
                targets.push(p);
            }
        }
        targets.sort();
        let c = &adapter.config;
        Ok(Self {
            spec: LoraSpec {
                r: c.r,
                alpha: c.lora_alpha,
                targets,
                use_rslora: c.use_rslora,
            },
            layers,
        })
    }

    /// Every parameter under its PEFT key, in a fixed order.
    pub fn named_params(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let mut ps: Vec<_> = layer.modules.iter().collect();
            ps.sort_by_key(|(p, _)| **p);
            for (p, (a, b, _)) in ps {
                out.push((peft_key(l, *p, 'A'), a.clone()));
                out.push((peft_key(l, *p, 'B'), b.clone()));
            }
        }
        out
    }

    /// A snapshot of the current weights as a PEFT adapter. Modules whose scale differs from
    /// the adapter's own (started from an adapter with `alpha_pattern`) keep it through an
    /// `alpha_pattern` entry naming the module.
    pub fn to_adapter(&self, base_model: Option<String>) -> Result<LoraAdapter> {
        let mut weights = BTreeMap::new();
        let mut alpha_pattern = HashMap::new();
        let r = self.spec.r as f64;
        let per_alpha = if self.spec.use_rslora { r.sqrt() } else { r };
        let default_scale = self.spec.alpha / per_alpha;
        for (l, layer) in self.layers.iter().enumerate() {
            for (p, (a, b, scale)) in &layer.modules {
                if (scale - default_scale).abs() > 1e-12 * default_scale.abs().max(1.0) {
                    alpha_pattern.insert(
                        format!("model.layers.{l}.{}.{}", p.parent(), p.name()),
                        scale * per_alpha,
                    );
                }
                weights.insert(
                    (l, *p),
                    LoraWeights {
                        a: a.as_tensor().copy()?,
                        b: b.as_tensor().copy()?,
                        scale: *scale,
                    },
                );
            }
        }
        let mut targets: Vec<_> = self.spec.targets.iter().map(|p| p.name()).collect();
        targets.sort();
        Ok(LoraAdapter {
            config: LoraConfig {
                r: self.spec.r,
                lora_alpha: self.spec.alpha,
                target_modules: serde_json::json!(targets),
                use_rslora: self.spec.use_rslora,
                base_model_name_or_path: base_model,
                alpha_pattern,
            },
            weights,
        })
    }
}

/// Per parameter name: the gradient summed over the steps so far.
#[derive(Default)]
pub struct GradAccum {
    pub grads: HashMap<String, Tensor>,
}

impl GradAccum {
    /// Adds every gradient of `other` into this one.
    pub fn merge(&mut self, other: GradAccum) -> Result<()> {
        for (name, g) in other.grads {
            self.add(name, g)?;
        }
        Ok(())
    }

    pub(super) fn add(&mut self, name: String, g: Tensor) -> Result<()> {
        let sum = match self.grads.remove(&name) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        self.grads.insert(name, sum);
        Ok(())
    }
}
