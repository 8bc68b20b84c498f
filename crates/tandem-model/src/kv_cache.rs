//! The paged KV cache: per layer, K and V tensors of `num_blocks * block_size` slots, each slot
//! holding one token's keys or values for every KV head. Which blocks belong to which sequence
//! is the scheduler's business; the cache only writes and reads slots.

use crate::error::Result;
use candle_core::{DType, Device, Tensor};

pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    /// Per layer: [num_blocks * block_size, num_kv_heads, head_dim].
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl KvCache {
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (num_blocks * block_size, num_kv_heads, head_dim);
        let mut k = Vec::with_capacity(num_layers);
        let mut v = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            k.push(Tensor::zeros(shape, dtype, device)?);
            v.push(Tensor::zeros(shape, dtype, device)?);
        }
        Ok(Self {
            block_size,
            num_blocks,
            k,
            v,
        })
    }

    /// Bytes one block takes across all layers (K and V).
    pub fn bytes_per_block(
        num_layers: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> usize {
        2 * num_layers * block_size * num_kv_heads * head_dim * dtype.size_in_bytes()
    }

    /// Writes `k`, `v` [T, num_kv_heads, head_dim] of `layer` into the slots `slots` [T] (u32).
    pub fn write(&self, layer: usize, k: &Tensor, v: &Tensor, slots: &Tensor) -> Result<()> {
        let (t, h, d) = k.dims3()?;
        let idx = slots
            .reshape((t, 1))?
            .broadcast_as((t, h * d))?
            .contiguous()?;
        let cache_k = self.k[layer].reshape((self.num_blocks * self.block_size, h * d))?;
        let cache_v = self.v[layer].reshape((self.num_blocks * self.block_size, h * d))?;
        cache_k.scatter_set(&idx, &k.reshape((t, h * d))?, 0)?;
        cache_v.scatter_set(&idx, &v.reshape((t, h * d))?, 0)?;
        Ok(())
    }
}

/// The slot of position `pos` of a sequence with block table `table`.
pub fn slot_of(table: &[u32], block_size: usize, pos: usize) -> u32 {
    table[pos / block_size] * block_size as u32 + (pos % block_size) as u32
}
