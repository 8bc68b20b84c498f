//! A unit's forward with its autograd graphs kept (`Unit::forward_kept`): for a supervised
//! unit of one-chunk examples, where memory allows, so that its backward recomputes nothing.

use super::super::fused::{self, host_vec};
use super::super::step::{KeptLayer, Segment};
use super::super::{SeqPhase, TrainableLora};
use super::Unit;
use crate::error::{ModelError, Result};
use crate::llama::Llama;
use candle_core::Var;

impl Unit {
    /// Whether `forward_kept` can run the unit's forward: supervised members not started,
    /// each one chunk long.
    pub fn can_keep(&self) -> bool {
        !self.eval
            && self.beta.is_none()
            && self.rl.is_none()
            && self.kept.is_empty()
            && self.members.iter().all(|m| {
                m.reference.is_none()
                    && m.seq.phase == SeqPhase::Forward(0)
                    && m.seq.fits_one_chunk()
                    && !m.seq.is_empty()
            })
    }

    /// The whole forward of the unit's members, packed, keeping every layer's activations for
    /// the backward (the hand-written CPU layer's, or candle's autograd graphs), which then
    /// needs no recompute (a third less arithmetic than recomputing from saved inputs, for the
    /// memory of the activations: `kept_bytes`). No K/V goes into a cache: each member is one
    /// chunk.
    pub fn forward_kept(&mut self, model: &Llama, lora: &TrainableLora) -> Result<()> {
        if !self.can_keep() {
            return Err(ModelError::Batch(
                "a kept-graph forward needs a supervised unit of one-chunk sequences not started"
                    .into(),
            ));
        }
        let tokens: Vec<u32> = self
            .members
            .iter()
            .flat_map(|m| m.seq.tokens.iter().copied())
            .collect();
        let segs: Vec<Segment> = self
            .members
            .iter()
            .map(|m| Segment::whole(m.seq.len()))
            .collect();
        let mut x = model.embed(&tokens)?;
        let mut kept = Vec::with_capacity(model.cfg.num_hidden_layers);
        if model.fused_layers() {
            let rows = x.dim(0)?;
            let mut h = host_vec(&x)?;
            for (l, layer_lora) in lora.layers.iter().enumerate() {
                let (out, acts) = fused::layer_forward(model, l, h, &segs, layer_lora)?;
                h = out;
                kept.push(Some(KeptLayer::Fused(Box::new(acts))));
            }
            x = candle_core::Tensor::from_vec(h, (rows, model.cfg.hidden_size), model.device())?;
        } else {
            for (l, layer_lora) in lora.layers.iter().enumerate() {
                let xv = Var::from_tensor(&x)?;
                let (out, _, _) = model.layer_segments(l, xv.as_tensor(), &segs, layer_lora)?;
                x = out.detach();
                kept.push(Some(KeptLayer::Graph(xv, out)));
            }
        }
        // One head pass for every member's rows.
        let heads = {
            let parts: Vec<_> = self
                .members
                .iter()
                .map(|m| m.seq.head_part(m.seq.len()))
                .collect();
            model.head_backward_many(&x, &parts)?
        };
        let mut off = 0;
        for (m, head) in self.members.iter_mut().zip(heads) {
            let n = m.seq.len();
            m.seq
                .finish_forward_with(model, 0, vec![x.narrow(0, off, n)?], head)?;
            off += n;
        }
        self.kept = kept;
        self.kept_layer_bytes = self.kept_layer_estimate(&model.cfg);
        Ok(())
    }

    /// Estimated bytes a kept-graph forward of this unit would hold (all layers).
    pub fn kept_bytes(&self, cfg: &crate::config::ModelConfig) -> usize {
        self.kept_layer_estimate(cfg) * cfg.num_hidden_layers
    }

    /// What a kept layer holds for the unit's rows, in f32 (autograd's graph or the CPU
    /// layer's `LayerActs`, about the same): the norms, projections before and after RoPE, the
    /// MLP's four wide tensors, and each member's attention scores and probabilities.
    fn kept_layer_estimate(&self, cfg: &crate::config::ModelConfig) -> usize {
        let h = cfg.hidden_size;
        let qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim;
        let per_row = 6 * h + 3 * qkv + 4 * cfg.intermediate_size;
        let (rows, att) = self.members.iter().fold((0, 0), |(r, a), m| {
            let n = m.seq.len();
            (r + n, a + 2 * cfg.num_attention_heads * n * n)
        });
        (rows * per_row + att) * 4
    }
}
