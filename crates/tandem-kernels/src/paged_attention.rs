//! Causal attention of packed query tokens over a paged KV cache.
//!
//! Query token `t` belongs to segment `token_segment[t]`, sits at position `positions[t]` of its
//! sequence, and attends to keys `0..=positions[t]` of that sequence (the last `sliding_window`
//! of them, if set), found through the segment's
//! block table: key `j` lives in slot `block_table[j / block_size] * block_size + j % block_size`.
//! The CPU path is the reference; devices without an implementation get an error naming the op.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Host-side varlen metadata for one packed batch.
#[derive(Debug, Clone)]
pub struct PagedAttentionMeta {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Per query token: index into `block_tables`.
    pub token_segment: Vec<u32>,
    /// Per query token: its position in its sequence.
    pub positions: Vec<u32>,
    /// Per segment: the physical block ids holding that sequence's keys, in order.
    pub block_tables: Vec<Vec<u32>>,
    /// Sliding-window attention (Mistral): a token at position `p` sees keys `p - w + 1 ..= p`.
    pub sliding_window: Option<usize>,
}

impl PagedAttentionMeta {
    /// The first key position a token at `pos` attends to.
    pub fn first_key(&self, pos: usize) -> usize {
        match self.sliding_window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        }
    }
}

impl PagedAttentionMeta {
    /// Checks that every key a query token needs is addressed by its block table.
    pub fn validate(&self, num_slots: usize) -> Result<()> {
        if self.block_size == 0 {
            candle_core::bail!("paged_attention: block_size must be > 0")
        }
        if self.token_segment.len() != self.positions.len() {
            candle_core::bail!(
                "paged_attention: {} segment ids for {} positions",
                self.token_segment.len(),
                self.positions.len()
            )
        }
        for (t, (&seg, &pos)) in self.token_segment.iter().zip(&self.positions).enumerate() {
            let Some(table) = self.block_tables.get(seg as usize) else {
                candle_core::bail!(
                    "paged_attention: token {t} names segment {seg}, which has no block table"
                )
            };
            let needed = pos as usize / self.block_size + 1;
            if table.len() < needed {
                candle_core::bail!(
                    "paged_attention: token {t} at position {pos} needs {needed} blocks, its table has {}",
                    table.len()
                )
            }
            if let Some(&b) = table[..needed]
                .iter()
                .find(|&&b| (b as usize + 1) * self.block_size > num_slots)
            {
                candle_core::bail!(
                    "paged_attention: block {b} is outside a cache of {num_slots} slots"
                )
            }
        }
        Ok(())
    }
}

struct PagedAttention<'a> {
    meta: &'a PagedAttentionMeta,
    scale: f32,
}

fn contiguous_f32<'s>(s: &'s CpuStorage, l: &Layout, what: &str) -> Result<&'s [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!(
            "paged_attention: {what} must be f32 on cpu, got {:?}",
            s.dtype()
        )
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("paged_attention: {what} must be contiguous"),
    }
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged_attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (t, nh, hd) = ql.shape().dims3()?;
        let (slots, nkv, khd) = kl.shape().dims3()?;
        if vl.shape() != kl.shape() || khd != hd || nkv == 0 || nh % nkv != 0 {
            candle_core::bail!(
                "paged_attention: q {:?}, k {:?}, v {:?} do not fit together",
                ql.shape(),
                kl.shape(),
                vl.shape()
            )
        }
        if t != self.meta.positions.len() {
            candle_core::bail!(
                "paged_attention: {t} query tokens, metadata for {}",
                self.meta.positions.len()
            )
        }
        self.meta.validate(slots)?;
        let q = contiguous_f32(qs, ql, "q")?;
        let k = contiguous_f32(ks, kl, "k cache")?;
        let v = contiguous_f32(vs, vl, "v cache")?;
        let group = nh / nkv;
        let bs = self.meta.block_size;
        let mut out = vec![0f32; t * nh * hd];
        out.par_chunks_mut(hd).enumerate().for_each(|(row, o)| {
            let (tok, h) = (row / nh, row % nh);
            let g = h / group;
            let pos = self.meta.positions[tok] as usize;
            let table = &self.meta.block_tables[self.meta.token_segment[tok] as usize];
            let qv = &q[row * hd..(row + 1) * hd];
            let slot = |j: usize| table[j / bs] as usize * bs + j % bs;
            let first = self.meta.first_key(pos);
            let mut scores = Vec::with_capacity(pos + 1 - first);
            let mut max = f32::NEG_INFINITY;
            for j in first..=pos {
                let base = (slot(j) * nkv + g) * hd;
                let kv = &k[base..base + hd];
                let s = qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * self.scale;
                max = max.max(s);
                scores.push(s);
            }
            let mut denom = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                denom += *s;
            }
            for (j, p) in (first..=pos).zip(&scores) {
                let base = (slot(j) * nkv + g) * hd;
                let w = p / denom;
                for (oi, vi) in o.iter_mut().zip(&v[base..base + hd]) {
                    *oi += w * vi;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((t, nh, hd))))
    }
}

/// Attention output `[T, num_heads, head_dim]` for queries `q` `[T, num_heads, head_dim]` over the
/// caches `k_cache`, `v_cache` `[num_slots, num_kv_heads, head_dim]`, scaled by `scale`.
///
/// CPU, f32 only; other devices and dtypes return an error naming the op, so callers can take a
/// generic path instead.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &PagedAttentionMeta,
    scale: f32,
) -> Result<Tensor> {
    if q.dtype() != DType::F32 {
        candle_core::bail!(
            "paged_attention: dtype {:?} has no implementation",
            q.dtype()
        )
    }
    q.apply_op3_no_bwd(k_cache, v_cache, &PagedAttention { meta, scale })
}
