//! Host views of CPU f32 tensors for the hand-written layer: a read guard on the tensor's
//! storage and its range, so that frozen weights are read in place, never copied.

use crate::error::{ModelError, Result};
use candle_core::{CpuStorage, Storage, StorageRef, Tensor};

/// A contiguous CPU f32 tensor's values, borrowed.
pub(super) struct HostF32<'a> {
    guard: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> HostF32<'a> {
    pub fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(ModelError::Batch(
                "the CPU layer path needs contiguous weights".into(),
            ));
        };
        if !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
            return Err(ModelError::Batch(format!(
                "the CPU layer path needs f32 host tensors, got {:?} on {:?}",
                t.dtype(),
                t.device().location()
            )));
        }
        Ok(Self {
            guard,
            start,
            len: end - start,
        })
    }

    pub fn get(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.start + self.len],
            // `new` admits only host f32 storage.
            _ => &[],
        }
    }
}

/// A tensor's values as f32, copied (small tensors: norms, LoRA weights, cached keys).
pub(crate) fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}
