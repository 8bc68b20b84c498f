//! The paged KV cache: per layer, K and V tensors of `num_blocks * block_size` slots, each slot
//! holding one token's keys or values for every KV head. Which blocks belong to which sequence
//! is the scheduler's business; the cache only writes and reads slots.

use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use tandem_kernels::PagedAttentionMeta;

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

    /// Writes `k`, `v` [T, num_kv_heads, head_dim] of `layer` into each token's slot (`meta`).
    pub fn write(
        &self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        meta: &PagedAttentionMeta,
    ) -> Result<()> {
        tandem_kernels::write_kv(&self.k[layer], k, meta)?;
        tandem_kernels::write_kv(&self.v[layer], v, meta)?;
        Ok(())
    }
}

/// The slot of position `pos` of a sequence with block table `table`.
pub fn slot_of(table: &[u32], block_size: usize, pos: usize) -> u32 {
    table[pos / block_size] * block_size as u32 + (pos % block_size) as u32
}
