//! A trainable LoRA adapter and one training sequence's token-level state machine.
//!
//! `SeqTrain` cuts a sequence into chunks. Forward: each chunk runs as a segment of a packed
//! batch (`Llama::forward_packed` with capture), which writes its K/V into the cache and hands
//! back the chunk's input to every layer; nothing else is kept. At the top the chunk's loss
//! gradient is formed at once. Backward: (layer, chunk) steps, top layer first, chunks in
//! reverse order inside a layer (`Llama::layer_backward`); each saved input is freed once its
//! layer is done. Each unit is small, so a scheduler can place any number of them in an
//! iteration.

use super::step::LayerLora;
use crate::error::{ModelError, Result};
use crate::kv_cache::{slot_of, KvCache};
use crate::llama::Llama;
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

    fn add(&mut self, name: String, g: Tensor) -> Result<()> {
        let sum = match self.grads.remove(&name) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        self.grads.insert(name, sum);
        Ok(())
    }
}

/// Where a training sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqPhase {
    /// The next chunk to run forward.
    Forward(usize),
    /// The next (layer, chunk) backward step.
    Backward(usize, usize),
    Done,
}

/// One training sequence's token-level forward and backward.
pub struct SeqTrain {
    pub tokens: Vec<u32>,
    /// labels[i]: the token position i predicts, if it is a target.
    labels: Vec<Option<u32>>,
    /// (first position, tokens) per chunk run forward so far (all of them once the forward
    /// is done). Chunks may differ in size: the caller picks each one's length.
    pub chunks: Vec<(usize, usize)>,
    /// The default (and largest) chunk length.
    chunk_tokens: usize,
    /// Per chunk, per layer: the chunk's input to that layer (freed when the layer is done).
    saved: Vec<Vec<Option<Tensor>>>,
    /// Per chunk: gradient w.r.t. the output of the layer being stepped.
    d_out: Vec<Option<Tensor>>,
    /// dK, dV of the layer being stepped, for every position [len, kv heads, head dim].
    d_kv: Option<(Tensor, Tensor)>,
    pub phase: SeqPhase,
    /// The loss's weight (1 / target tokens of the whole batch for a supervised mean).
    weight: f64,
    /// The weight is not known yet (DPO: it depends on the pair's log-probabilities): the
    /// top-layer gradients are of Σ -log p, scaled by `set_weight` before the backward.
    weight_pending: bool,
    /// Σ -log p over targets so far, their count, and how many were the argmax.
    pub loss_sum: f64,
    pub targets: usize,
    pub correct: usize,
}

impl SeqTrain {
    /// `target[i]`: token i is predicted and counts (see `Example`). `weight` multiplies this
    /// sequence's summed loss (1 / target tokens of the batch for a mean over the batch).
    pub fn new(tokens: Vec<u32>, target: &[bool], chunk_tokens: usize, weight: f64) -> Self {
        let n = tokens.len();
        let labels = (0..n)
            .map(|i| (i + 1 < n && target[i + 1]).then(|| tokens[i + 1]))
            .collect();
        Self {
            tokens,
            labels,
            chunks: Vec::new(),
            chunk_tokens: chunk_tokens.max(1),
            saved: Vec::new(),
            d_out: Vec::new(),
            d_kv: None,
            phase: if n == 0 {
                SeqPhase::Done
            } else {
                SeqPhase::Forward(0)
            },
            weight,
            weight_pending: false,
            loss_sum: 0.0,
            targets: 0,
            correct: 0,
        }
    }

    /// A sequence whose loss weight is known only once forwards are done (`set_weight`).
    pub fn deferred(tokens: Vec<u32>, target: &[bool], chunk_tokens: usize) -> Self {
        let mut s = Self::new(tokens, target, chunk_tokens, 1.0);
        s.weight_pending = true;
        s
    }

    /// Sets a deferred weight once the forward is done: the top-layer gradients, formed for
    /// weight 1, are scaled (the backward is linear in them).
    pub fn set_weight(&mut self, weight: f64) -> Result<()> {
        if !self.weight_pending {
            return Err(ModelError::Batch(
                "the sequence's loss weight is already set".into(),
            ));
        }
        if matches!(self.phase, SeqPhase::Forward(_)) {
            return Err(ModelError::Batch(
                "a loss weight is set after the sequence's forward".into(),
            ));
        }
        for d in self.d_out.iter_mut().flatten() {
            *d = (&*d * weight)?;
        }
        self.weight = weight;
        self.weight_pending = false;
        Ok(())
    }

    /// Σ log p of the targets run so far (the policy's log-probability of its answer).
    pub fn logprob_sum(&self) -> f64 {
        -self.loss_sum
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The next forward chunk: (chunk index, first position, tokens), if forward is not done.
    pub fn next_forward(&self) -> Option<(usize, usize, &[u32])> {
        self.next_forward_max(usize::MAX)
    }

    /// The next forward chunk, at most `max` tokens long (at least one).
    pub fn next_forward_max(&self, max: usize) -> Option<(usize, usize, &[u32])> {
        match self.phase {
            SeqPhase::Forward(c) => {
                let s = self.chunks.last().map_or(0, |&(s, n)| s + n);
                let n = self.chunk_tokens.min(max).max(1).min(self.len() - s);
                Some((c, s, &self.tokens[s..s + n]))
            }
            _ => None,
        }
    }

    /// Takes the captured layer inputs of forward chunk `c` (num_layers + 1 tensors, the last
    /// being the top layer's output) and forms the chunk's loss gradient.
    pub fn finish_forward(
        &mut self,
        model: &Llama,
        c: usize,
        mut inputs: Vec<Tensor>,
    ) -> Result<()> {
        if self.phase != SeqPhase::Forward(c) {
            return Err(ModelError::Batch(format!(
                "training chunk {c} is not the next forward chunk"
            )));
        }
        let top = inputs
            .pop()
            .ok_or_else(|| ModelError::Batch("no captured activations".into()))?;
        // The chunk is as long as what was run (see `next_forward_max`).
        let s = self.chunks.last().map_or(0, |&(s, n)| s + n);
        let n = top.dim(0)?;
        if n == 0 || s + n > self.len() {
            return Err(ModelError::Batch(format!(
                "training chunk {c} of {n} tokens at {s} does not fit the sequence of {}",
                self.len()
            )));
        }
        let head = model.head_backward(&top, &self.labels[s..s + n], self.weight)?;
        self.loss_sum += head.loss_sum;
        self.targets += head.targets;
        self.correct += head.correct;
        let d = head.d_x;
        self.chunks.push((s, n));
        self.d_out.push(Some(d));
        self.saved.push(inputs.into_iter().map(Some).collect());
        self.phase = if s + n < self.len() {
            SeqPhase::Forward(c + 1)
        } else {
            self.merge_chunks()?;
            SeqPhase::Backward(model.cfg.num_hidden_layers - 1, self.chunks.len() - 1)
        };
        Ok(())
    }

    /// Joins consecutive forward chunks into backward chunks of up to `chunk_tokens` tokens
    /// (a co-serving scheduler may have run the forward in short pieces to fit its latency
    /// budget; the backward need not pay a step's fixed cost per piece). The gradients are the
    /// same: a (layer, chunk) step over the joined tokens is the steps over its pieces.
    fn merge_chunks(&mut self) -> Result<()> {
        let mut groups: Vec<(usize, usize)> = Vec::new(); // (first chunk, chunks)
        let mut tokens = 0;
        for (c, &(_, n)) in self.chunks.iter().enumerate() {
            match groups.last_mut() {
                Some((_, k)) if tokens + n <= self.chunk_tokens => {
                    *k += 1;
                    tokens += n;
                }
                _ => {
                    groups.push((c, 1));
                    tokens = n;
                }
            }
        }
        if groups.len() == self.chunks.len() {
            return Ok(());
        }
        let cat = |ts: Vec<Tensor>| -> Result<Tensor> {
            Ok(if ts.len() == 1 {
                ts.into_iter().next().expect("one")
            } else {
                Tensor::cat(&ts, 0)?
            })
        };
        let mut chunks = Vec::with_capacity(groups.len());
        let mut saved = Vec::with_capacity(groups.len());
        let mut d_out = Vec::with_capacity(groups.len());
        let layers = self.saved.first().map_or(0, Vec::len);
        for &(first, k) in &groups {
            let range = first..first + k;
            let (start, _) = self.chunks[first];
            let len = self.chunks[range.clone()].iter().map(|&(_, n)| n).sum();
            chunks.push((start, len));
            let mut per_layer = Vec::with_capacity(layers);
            for l in 0..layers {
                let parts = range
                    .clone()
                    .map(|c| {
                        self.saved[c][l].take().ok_or_else(|| {
                            ModelError::Batch(format!("no saved input for layer {l}, chunk {c}"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                per_layer.push(Some(cat(parts)?));
            }
            saved.push(per_layer);
            let parts = range
                .clone()
                .map(|c| {
                    self.d_out[c].take().ok_or_else(|| {
                        ModelError::Batch(format!("no output gradient for chunk {c}"))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            d_out.push(Some(cat(parts)?));
        }
        self.chunks = chunks;
        self.saved = saved;
        self.d_out = d_out;
        Ok(())
    }

    /// Runs the next backward step, reading earlier tokens' K/V from `cache` through
    /// `block_table`, and adds the LoRA gradients into `acc`.
    pub fn backward_step(
        &mut self,
        model: &Llama,
        cache: &KvCache,
        block_table: &[u32],
        lora: &TrainableLora,
        acc: &mut GradAccum,
    ) -> Result<()> {
        let SeqPhase::Backward(l, c) = self.phase else {
            return Err(ModelError::Batch("no backward step is due".into()));
        };
        if self.weight_pending {
            return Err(ModelError::Batch(
                "the sequence's loss weight is not set yet".into(),
            ));
        }
        let (start, len) = self.chunks[c];
        let dev = model.device();
        if self.d_kv.is_none() {
            let shape = (
                self.len(),
                model.cfg.num_key_value_heads,
                model.cfg.head_dim,
            );
            let z = Tensor::zeros(shape, model.dtype(), dev)?;
            self.d_kv = Some((z.clone(), z));
        }
        let (prev_k, prev_v) = if start > 0 {
            let slots: Vec<u32> = (0..start)
                .map(|p| slot_of(block_table, cache.block_size, p))
                .collect();
            let idx = Tensor::new(slots.as_slice(), dev)?;
            (
                Some(cache.k[l].index_select(&idx, 0)?),
                Some(cache.v[l].index_select(&idx, 0)?),
            )
        } else {
            (None, None)
        };
        let x = self.saved[c]
            .get_mut(l)
            .and_then(Option::take)
            .ok_or_else(|| ModelError::Batch(format!("no saved input for layer {l}, chunk {c}")))?;
        let d_out = self.d_out[c].take().ok_or_else(|| {
            ModelError::Batch(format!("no output gradient for layer {l}, chunk {c}"))
        })?;
        let (dk, dv) = self.d_kv.take().expect("set above");
        let g = model.layer_backward(
            l,
            &x,
            start,
            prev_k.as_ref(),
            prev_v.as_ref(),
            &d_out,
            &dk.narrow(0, start, len)?,
            &dv.narrow(0, start, len)?,
            &lora.layers[l],
        )?;
        let add_prev = |buf: Tensor, d: Option<Tensor>| -> Result<Tensor> {
            Ok(match d {
                Some(d) => {
                    buf.slice_scatter0(&(buf.narrow(0, 0, start)? + d.to_dtype(buf.dtype())?)?, 0)?
                }
                None => buf,
            })
        };
        self.d_kv = Some((add_prev(dk, g.d_k_prev)?, add_prev(dv, g.d_v_prev)?));
        for (p, (da, db)) in g.lora {
            acc.add(peft_key(l, p, 'A'), da)?;
            acc.add(peft_key(l, p, 'B'), db)?;
        }
        self.d_out[c] = Some(g.d_x);
        self.phase = if c > 0 {
            SeqPhase::Backward(l, c - 1)
        } else if l > 0 {
            // Layer l is done: its dK/dV start afresh for the layer below.
            self.d_kv = None;
            SeqPhase::Backward(l - 1, self.chunks.len() - 1)
        } else {
            self.d_kv = None;
            self.d_out.iter_mut().for_each(|d| *d = None);
            SeqPhase::Done
        };
        Ok(())
    }

    /// Bytes of activations this sequence holds now (saved inputs, gradients, dK/dV buffers).
    pub fn held_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let saved: usize = self.saved.iter().flatten().flatten().map(bytes).sum();
        let d: usize = self.d_out.iter().flatten().map(bytes).sum();
        let kv = self.d_kv.as_ref().map_or(0, |(k, v)| bytes(k) + bytes(v));
        saved + d + kv
    }
}
