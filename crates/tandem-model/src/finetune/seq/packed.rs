//! Backward steps shared by several single-chunk sequences (a packed unit): one step per
//! layer over all their rows, recomputed from their saved inputs or through a kept graph.

use super::super::step::KeptLayer;
use super::super::trainer::{peft_key, GradAccum, TrainableLora};
use super::{SeqPhase, SeqTrain};
use crate::error::{ModelError, Result};
use crate::llama::Llama;
use candle_core::Tensor;

impl SeqTrain {
    /// The layer of this sequence's next backward step if it can join a packed step: the
    /// sequence is one chunk (from position 0, so no other chunk's K/V enters) and its weight
    /// is set.
    pub fn packable_layer(&self) -> Option<usize> {
        match self.phase {
            SeqPhase::Backward(l, 0) if self.chunks.len() == 1 && !self.weight_pending => Some(l),
            _ => None,
        }
    }

    /// Runs the next backward step of every sequence of `seqs` as one step over their rows
    /// packed together (`Llama::layer_backward_packed`): each must be `packable_layer` at the
    /// same layer. Their LoRA gradients are summed into `acc`, as their separate steps would.
    pub fn packed_backward_step(
        seqs: &mut [&mut SeqTrain],
        model: &Llama,
        lora: &TrainableLora,
        acc: &mut GradAccum,
    ) -> Result<()> {
        Self::packed_step(seqs, model, lora, acc, None)
    }

    /// `packed_backward_step`, or with `kept` (the layer's forward over the sequences' rows,
    /// kept by `Unit::forward_kept`) the backward from it instead of a recompute from saved
    /// inputs.
    pub(in crate::finetune) fn packed_step(
        seqs: &mut [&mut SeqTrain],
        model: &Llama,
        lora: &TrainableLora,
        acc: &mut GradAccum,
        kept: Option<KeptLayer>,
    ) -> Result<()> {
        let layer = seqs.first().and_then(|s| s.packable_layer());
        let Some(l) = layer.filter(|&l| seqs.iter().all(|s| s.packable_layer() == Some(l))) else {
            return Err(ModelError::Batch(
                "a packed backward step needs single-chunk sequences at the same layer".into(),
            ));
        };
        let mut xs = Vec::with_capacity(seqs.len());
        let mut ds = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            if kept.is_none() {
                xs.push(s.saved[0][l].take().ok_or_else(|| {
                    ModelError::Batch(format!("no saved input for layer {l}, chunk 0"))
                })?);
            }
            ds.push(s.d_out[0].take().ok_or_else(|| {
                ModelError::Batch(format!("no output gradient for layer {l}, chunk 0"))
            })?);
        }
        let d_out = Tensor::cat(&ds, 0)?;
        let g = match kept {
            Some(k) => k.backward(model, &d_out, &lora.layers[l])?,
            None => {
                let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
                model.layer_backward_packed(
                    l,
                    &Tensor::cat(&xs, 0)?,
                    &lens,
                    &d_out,
                    &lora.layers[l],
                )?
            }
        };
        for (p, (da, db)) in g.lora {
            acc.add(peft_key(l, p, 'A'), da)?;
            acc.add(peft_key(l, p, 'B'), db)?;
        }
        let mut off = 0;
        for s in seqs.iter_mut() {
            let n = s.len();
            if l > 0 {
                s.d_out[0] = Some(g.d_x.narrow(0, off, n)?);
                s.phase = SeqPhase::Backward(l - 1, 0);
            } else {
                s.d_out[0] = None;
                s.phase = SeqPhase::Done;
            }
            s.d_kv = None;
            off += n;
        }
        Ok(())
    }
}
