//! The gathered attention path: attention over a packed batch through plain candle ops, for
//! any device, dtype and head size (the `paged_attention` kernel covers f32 on the CPU and
//! f32/bf16 on CUDA for head sizes 32-128; `Llama` falls back here otherwise, and the kernel's
//! tests and `tandem bench attention` compare against it).

use crate::batch::PackedBatch;
use crate::error::Result;
use crate::kv_cache::slot_of;
use candle_core::{DType, Tensor};
use tandem_kernels::PagedAttentionMeta;

/// Attention through plain candle ops (any device and dtype): per segment, gather the
/// sequence's keys and values from the cache, mask causally by position, softmax in f32.
pub fn attention_gathered(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &PagedAttentionMeta,
    batch: &PackedBatch,
    scale: f32,
) -> Result<Tensor> {
    let (_, nh, hd) = q.dims3()?;
    let (_, nkv, _) = k_cache.dims3()?;
    let group = nh / nkv;
    let dev = q.device();
    let mut outs = Vec::with_capacity(batch.segments.len());
    for s in &batch.segments {
        let pos = &batch.positions[s.start..s.start + s.len];
        let ctx = *pos.iter().max().unwrap_or(&0) as usize + 1;
        let idx: Vec<u32> = (0..ctx)
            .map(|p| slot_of(&s.block_table, meta.block_size, p))
            .collect();
        let idx = Tensor::new(idx.as_slice(), dev)?;
        let expand = |c: &Tensor| -> Result<Tensor> {
            Ok(c.index_select(&idx, 0)?
                .to_dtype(DType::F32)?
                .transpose(0, 1)?
                .unsqueeze(1)?
                .broadcast_as((nkv, group, ctx, hd))?
                .reshape((nh, ctx, hd))?)
        };
        let k = expand(k_cache)?;
        let v = expand(v_cache)?;
        let qs = q
            .narrow(0, s.start, s.len)?
            .to_dtype(DType::F32)?
            .transpose(0, 1)?
            .contiguous()?;
        let mut mask = Vec::with_capacity(s.len * ctx);
        for &p in pos {
            let first = meta.first_key(p as usize);
            mask.extend((0..ctx).map(|j| {
                if j >= first && j <= p as usize {
                    0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
        let mask = Tensor::from_vec(mask, (1, s.len, ctx), dev)?;
        let att = (qs.matmul(&k.t()?)? * scale as f64)?.broadcast_add(&mask)?;
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let o = att.matmul(&v)?.transpose(0, 1)?.to_dtype(q.dtype())?;
        outs.push(o);
    }
    Ok(Tensor::cat(&outs, 0)?.contiguous()?)
}
