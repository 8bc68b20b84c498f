//! One training sequence's token-level state machine.
//!
//! `SeqTrain` cuts a sequence into chunks. Forward: each chunk runs as a segment of a packed
//! batch (`Llama::forward_packed` with capture), which writes its K/V into the cache and hands
//! back the chunk's input to every layer; nothing else is kept. At the top the chunk's loss
//! gradient is formed at once (or, for a weight known only later, for weight 1 and scaled by
//! `set_weight`). Backward: (layer, chunk) steps, top layer first, chunks in reverse order inside
//! a layer (`Llama::layer_backward`); each saved input is freed once its layer is done. Each unit
//! is small, so a scheduler can place any number of them in an iteration.

use super::head::HeadOut;
use super::trainer::{peft_key, GradAccum, TrainableLora};
use crate::error::{ModelError, Result};
use crate::kv_cache::{slot_of, KvCache};
use crate::llama::Llama;
use candle_core::Tensor;

mod packed;

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
    /// log p of each target so far, in order (a per-token weight's input: GRPO's KL term).
    pub token_logps: Vec<f32>,
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
            token_logps: Vec::new(),
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

    /// Sets a deferred weight per target token (in order: `token_logps`'s), once the forward
    /// is done: each top-layer gradient row, formed for weight 1, is scaled by its token's
    /// weight (the head's backward is row by row, the layers' linear in it).
    pub fn set_token_weights(&mut self, weights: &[f64]) -> Result<()> {
        if !self.weight_pending || matches!(self.phase, SeqPhase::Forward(_)) {
            return Err(ModelError::Batch(
                "per-token weights are set once, after the sequence's forward".into(),
            ));
        }
        if weights.len() != self.targets {
            return Err(ModelError::Batch(format!(
                "{} token weights for {} target tokens",
                weights.len(),
                self.targets
            )));
        }
        // Per position: the weight of the target it predicts, 0 where none.
        let mut per_pos = vec![0f32; self.len()];
        let mut k = 0;
        for (p, l) in self.labels.iter().enumerate() {
            if l.is_some() {
                per_pos[p] = weights[k] as f32;
                k += 1;
            }
        }
        for (c, &(start, len)) in self.chunks.iter().enumerate() {
            if let Some(d) = self.d_out[c].as_mut() {
                let w = Tensor::new(&per_pos[start..start + len], d.device())?
                    .to_dtype(d.dtype())?
                    .unsqueeze(1)?;
                *d = d.broadcast_mul(&w)?;
            }
        }
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
    pub fn finish_forward(&mut self, model: &Llama, c: usize, inputs: Vec<Tensor>) -> Result<()> {
        let (s, n) = self.check_chunk(c, &inputs)?;
        let top = &inputs[inputs.len() - 1];
        let head = model.head_backward(top, &self.labels[s..s + n], self.weight)?;
        self.finish_forward_with(model, c, inputs, head)
    }

    /// Where forward chunk `c` with these captured inputs lies: (first position, tokens).
    fn check_chunk(&self, c: usize, inputs: &[Tensor]) -> Result<(usize, usize)> {
        if self.phase != SeqPhase::Forward(c) {
            return Err(ModelError::Batch(format!(
                "training chunk {c} is not the next forward chunk"
            )));
        }
        let top = inputs
            .last()
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
        Ok((s, n))
    }

    /// The labels and loss weight of forward chunk `c` of `n` tokens (what its head pass takes,
    /// when several sequences' heads run together: `Llama::head_backward_many`).
    pub fn head_part(&self, n: usize) -> (&[Option<u32>], f64) {
        let s = self.chunks.last().map_or(0, |&(s, n)| s + n);
        (&self.labels[s..(s + n).min(self.len())], self.weight)
    }

    /// `finish_forward` with the chunk's head pass already run (`head`, over `head_part`).
    pub fn finish_forward_with(
        &mut self,
        model: &Llama,
        c: usize,
        mut inputs: Vec<Tensor>,
        head: HeadOut,
    ) -> Result<()> {
        let (s, n) = self.check_chunk(c, &inputs)?;
        inputs.pop();
        self.loss_sum += head.loss_sum;
        self.targets += head.targets;
        self.correct += head.correct;
        self.token_logps.extend_from_slice(&head.logps);
        self.chunks.push((s, n));
        self.d_out.push(Some(head.d_x));
        self.saved.push(inputs.into_iter().map(Some).collect());
        self.phase = if s + n < self.len() {
            SeqPhase::Forward(c + 1)
        } else {
            self.merge_chunks()?;
            SeqPhase::Backward(model.cfg.num_hidden_layers - 1, self.chunks.len() - 1)
        };
        Ok(())
    }

    /// Whether the whole sequence is one chunk (what a forward with a kept graph takes).
    pub fn fits_one_chunk(&self) -> bool {
        self.len() <= self.chunk_tokens
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
