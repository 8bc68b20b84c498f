//! Causal attention of packed query tokens over a paged KV cache, and the cache write.
//!
//! Query token `t` belongs to segment `token_segment[t]`, sits at position `positions[t]` of its
//! sequence, and attends to keys `0..=positions[t]` of that sequence (the last `sliding_window`
//! of them, if set), found through the segment's
//! block table: key `j` lives in slot `block_table[j / block_size] * block_size + j % block_size`.
//!
//! Both paths cut the batch into the same work items (`work_list`): up to `MAX_ROWS` (token,
//! query head) rows of one sequence that share a KV head, whose keys are walked in tiles of
//! `TILE` with an online softmax (kernels/paged_attention.cu). The CPU path (f32) mirrors the
//! kernel step by step and is the reference the CUDA path (f32, bf16) is checked against;
//! devices and dtypes without an implementation get an error naming the op.

use crate::cpu::{contiguous_f32, dot};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, InplaceOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Keys per tile (TILE in kernels/paged_attention.cu).
pub const TILE: usize = 32;
/// (token, query head) rows per work item (MAX_ROWS in kernels/paged_attention.cu).
pub const MAX_ROWS: usize = 16;

/// Host-side varlen metadata for one packed batch.
///
/// Built once per forward and shared by every layer: the device copy of it (block tables,
/// positions, slots, work list) is made on first use and kept, so fields must not change after
/// the first call that uses it; build a new one for a new batch.
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
    #[cfg(feature = "cuda")]
    pub(crate) cuda: crate::cuda::AttentionPlans,
}

impl Clone for PagedAttentionMeta {
    fn clone(&self) -> Self {
        Self::new(
            self.block_size,
            self.token_segment.clone(),
            self.positions.clone(),
            self.block_tables.clone(),
            self.sliding_window,
        )
    }
}

impl std::fmt::Debug for PagedAttentionMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedAttentionMeta")
            .field("block_size", &self.block_size)
            .field("token_segment", &self.token_segment)
            .field("positions", &self.positions)
            .field("block_tables", &self.block_tables)
            .field("sliding_window", &self.sliding_window)
            .finish()
    }
}

impl PagedAttentionMeta {
    pub fn new(
        block_size: usize,
        token_segment: Vec<u32>,
        positions: Vec<u32>,
        block_tables: Vec<Vec<u32>>,
        sliding_window: Option<usize>,
    ) -> Self {
        Self {
            block_size,
            token_segment,
            positions,
            block_tables,
            sliding_window,
            #[cfg(feature = "cuda")]
            cuda: Default::default(),
        }
    }

    /// The first key position a token at `pos` attends to.
    pub fn first_key(&self, pos: usize) -> usize {
        match self.sliding_window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        }
    }

    /// The cache slot of each query token's own key and value.
    pub fn slots(&self) -> Vec<u32> {
        self.token_segment
            .iter()
            .zip(&self.positions)
            .map(|(&s, &p)| {
                let table = &self.block_tables[s as usize];
                let p = p as usize;
                table[p / self.block_size] * self.block_size as u32 + (p % self.block_size) as u32
            })
            .collect()
    }

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

/// One work item: `tokens` consecutive query tokens of segment `segment` from `first_token`,
/// times the `heads` query heads `first_head..` of one KV head's group (`tokens * heads <=
/// MAX_ROWS`). Items cover every (token, query head) once per KV head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkItem {
    pub segment: u32,
    pub first_token: u32,
    pub tokens: u32,
    pub first_head: u32,
    pub heads: u32,
}

impl WorkItem {
    pub fn rows(&self) -> usize {
        (self.tokens * self.heads) as usize
    }
}

/// The work items of a batch whose query tokens belong to `token_segment`, for `group` query
/// heads per KV head: runs of consecutive tokens of one segment, cut so each item has at most
/// `MAX_ROWS` rows (all the group's heads per item when the group fits, else slices of it).
pub fn work_list(token_segment: &[u32], group: usize) -> Vec<WorkItem> {
    let hn = group.clamp(1, MAX_ROWS);
    let per_item = (MAX_ROWS / hn).max(1);
    let mut items = Vec::new();
    let mut a = 0;
    while a < token_segment.len() {
        let seg = token_segment[a];
        let b = a + token_segment[a..].iter().take_while(|&&s| s == seg).count();
        for h0 in (0..group).step_by(hn) {
            for t in (a..b).step_by(per_item) {
                items.push(WorkItem {
                    segment: seg,
                    first_token: t as u32,
                    tokens: per_item.min(b - t) as u32,
                    first_head: h0 as u32,
                    heads: hn.min(group - h0) as u32,
                });
            }
        }
        a = b;
    }
    items
}

/// Shapes `(tokens, heads, kv heads, head dim)` of an attention call, checked against each other
/// and against the metadata (every key a token needs lies inside the cache).
pub(crate) fn check_shapes(
    meta: &PagedAttentionMeta,
    ql: &Layout,
    kl: &Layout,
    vl: &Layout,
) -> Result<(usize, usize, usize, usize)> {
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
    if t != meta.positions.len() {
        candle_core::bail!(
            "paged_attention: {t} query tokens, metadata for {}",
            meta.positions.len()
        )
    }
    meta.validate(slots)?;
    Ok((t, nh, nkv, hd))
}

struct PagedAttention<'a> {
    meta: &'a PagedAttentionMeta,
    scale: f32,
}

/// `e^x` for `x <= 0` (softmax weights), 0 below -87 and for -inf: Cody-Waite reduction to
/// `r` in [-ln2/2, ln2/2] and a degree-7 Taylor polynomial (relative error < 1e-7), all
/// branch-free so loops over it vectorize. Not for `x > 0`.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    let xc = x.max(-87.0);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut e = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        e = e * r + c;
    }
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        e * scale
    }
}

type Inputs<'a> = (&'a [f32], &'a [f32], &'a [f32]);

/// `cpu_item` compiled for AVX2 + FMA, used where the CPU has them (checked at run time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn cpu_item_avx2(
    meta: &PagedAttentionMeta,
    item: &WorkItem,
    g: usize,
    qkv: Inputs,
    dims: (usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    cpu_item(meta, item, g, qkv, dims, scale)
}

fn cpu_item_best(
    meta: &PagedAttentionMeta,
    item: &WorkItem,
    g: usize,
    qkv: Inputs,
    dims: (usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function was compiled for (checked just above).
        return unsafe { cpu_item_avx2(meta, item, g, qkv, dims, scale) };
    }
    cpu_item(meta, item, g, qkv, dims, scale)
}

/// One work item on one KV head `g`, as the kernel's block does it; returns the item's rows
/// (row `r` = token `r / heads`, head `r % heads`) of `hd` outputs each.
#[inline(always)]
fn cpu_item(
    meta: &PagedAttentionMeta,
    item: &WorkItem,
    g: usize,
    (q, k, v): Inputs,
    (nh, nkv, hd): (usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    let (rows, hn) = (item.rows(), item.heads as usize);
    let group = nh / nkv;
    let bs = meta.block_size;
    let table = &meta.block_tables[item.segment as usize];
    let row_token = |r: usize| item.first_token as usize + r / hn;
    let row_head = |r: usize| g * group + item.first_head as usize + r % hn;
    let pos: Vec<usize> = (0..rows)
        .map(|r| meta.positions[row_token(r)] as usize)
        .collect();
    let first: Vec<usize> = pos.iter().map(|&p| meta.first_key(p)).collect();
    let lo = first.iter().copied().min().unwrap_or(0);
    let hi = pos.iter().copied().max().unwrap_or(0);
    let qs: Vec<f32> = (0..rows)
        .flat_map(|r| {
            let at = (row_token(r) * nh + row_head(r)) * hd;
            q[at..at + hd].iter().map(|x| x * scale)
        })
        .collect();
    let (mut m, mut l) = (vec![f32::NEG_INFINITY; rows], vec![0f32; rows]);
    let mut acc = vec![0f32; rows * hd];
    // The tile's keys as offsets into the caches (the kernel stages them in shared memory; on
    // the CPU they are read in place).
    let mut at = [0usize; TILE];
    let mut p = [0f32; TILE];
    let mut ts = lo - lo % TILE;
    while ts <= hi {
        for (j, a) in at.iter_mut().enumerate() {
            let kj = (ts + j).clamp(lo, hi);
            *a = ((table[kj / bs] as usize * bs + kj % bs) * nkv + g) * hd;
        }
        for r in 0..rows {
            if ts > pos[r] || ts + TILE <= first[r] {
                continue;
            }
            let qr = &qs[r * hd..][..hd];
            let mut tile_max = f32::NEG_INFINITY;
            for (j, pj) in p.iter_mut().enumerate() {
                let kj = ts + j;
                *pj = if kj >= first[r] && kj <= pos[r] {
                    let s = dot(qr, &k[at[j]..][..hd]);
                    tile_max = tile_max.max(s);
                    s
                } else {
                    f32::NEG_INFINITY
                };
            }
            let m_new = m[r].max(tile_max);
            let corr = exp(m[r] - m_new);
            for pj in p.iter_mut() {
                *pj = exp(*pj - m_new);
            }
            let sum: f32 = p.iter().sum();
            l[r] = l[r] * corr + sum;
            let o = &mut acc[r * hd..][..hd];
            o.iter_mut().for_each(|x| *x *= corr);
            for (j, &pj) in p.iter().enumerate() {
                if pj != 0.0 {
                    for (x, vv) in o.iter_mut().zip(&v[at[j]..][..hd]) {
                        *x += pj * vv;
                    }
                }
            }
            m[r] = m_new;
        }
        ts += TILE;
    }
    for (o, l) in acc.chunks_mut(hd).zip(&l) {
        o.iter_mut().for_each(|x| *x /= l);
    }
    acc
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
        let (t, nh, nkv, hd) = check_shapes(self.meta, ql, kl, vl)?;
        let q = contiguous_f32(qs, ql, "paged_attention", "q")?;
        let k = contiguous_f32(ks, kl, "paged_attention", "k cache")?;
        let v = contiguous_f32(vs, vl, "paged_attention", "v cache")?;
        let items = work_list(&self.meta.token_segment, nh / nkv);
        let tasks: Vec<(usize, usize)> = (0..items.len())
            .flat_map(|i| (0..nkv).map(move |g| (i, g)))
            .collect();
        let results: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(i, g)| {
                cpu_item_best(
                    self.meta,
                    &items[i],
                    g,
                    (q, k, v),
                    (nh, nkv, hd),
                    self.scale,
                )
            })
            .collect();
        let mut out = vec![0f32; t * nh * hd];
        let group = nh / nkv;
        for (&(i, g), rows) in tasks.iter().zip(&results) {
            let item = &items[i];
            let hn = item.heads as usize;
            for (r, o) in rows.chunks(hd).enumerate() {
                let tok = item.first_token as usize + r / hn;
                let head = g * group + item.first_head as usize + r % hn;
                out[(tok * nh + head) * hd..][..hd].copy_from_slice(o);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((t, nh, hd))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::paged_attention_fwd(self.meta, self.scale, qs, ql, ks, kl, vs, vl)
    }
}

/// Whether `paged_attention` has an implementation for this device, dtype and head size
/// (callers take a generic path otherwise).
pub fn paged_attention_supported(
    device: &candle_core::Device,
    dtype: DType,
    head_dim: usize,
) -> bool {
    match device {
        candle_core::Device::Cpu => dtype == DType::F32,
        candle_core::Device::Cuda(_) => {
            matches!(dtype, DType::F32 | DType::BF16)
                && head_dim.is_multiple_of(32)
                && head_dim <= 128
        }
        _ => false,
    }
}

/// Attention output `[T, num_heads, head_dim]` for queries `q` `[T, num_heads, head_dim]` over the
/// caches `k_cache`, `v_cache` `[num_slots, num_kv_heads, head_dim]`, scaled by `scale`.
///
/// CPU: f32. CUDA: f32 and bf16, head_dim a multiple of 32 up to 128 (`paged_attention_supported`);
/// anything else returns an error naming the op.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &PagedAttentionMeta,
    scale: f32,
) -> Result<Tensor> {
    let (t, nh, hd) = q.dims3()?;
    if !paged_attention_supported(q.device(), q.dtype(), hd) {
        candle_core::bail!(
            "paged_attention: no implementation for {:?} with head_dim {hd} on {:?}",
            q.dtype(),
            q.device()
        )
    }
    if t == 0 {
        return Tensor::zeros((0, nh, hd), q.dtype(), q.device());
    }
    q.apply_op3_no_bwd(k_cache, v_cache, &PagedAttention { meta, scale })
}

struct WriteKv<'a> {
    meta: &'a PagedAttentionMeta,
}

/// Rows of `row` elements: `dst[slots[t]] = src[t]`.
fn copy_rows<T: Copy>(dst: &mut [T], src: &[T], slots: &[u32], row: usize) {
    for (t, &slot) in slots.iter().enumerate() {
        dst[slot as usize * row..][..row].copy_from_slice(&src[t * row..][..row]);
    }
}

/// `(tokens, row elements)` of a cache write, checked: the cache [slots, kv heads, head dim] is
/// whole and contiguous, `src` [tokens, kv heads, head dim] matches it and the metadata.
pub(crate) fn check_write(
    meta: &PagedAttentionMeta,
    cl: &Layout,
    sl: &Layout,
) -> Result<(usize, usize)> {
    let (slots, nkv, hd) = cl.shape().dims3()?;
    let (t, snkv, shd) = sl.shape().dims3()?;
    if (snkv, shd) != (nkv, hd) || t != meta.positions.len() {
        candle_core::bail!(
            "write_kv: values {:?} do not fit a cache {:?} and {} tokens",
            sl.shape(),
            cl.shape(),
            meta.positions.len()
        )
    }
    if cl.contiguous_offsets().is_none() || sl.contiguous_offsets().is_none() {
        candle_core::bail!("write_kv: the cache and the values must be contiguous")
    }
    meta.validate(slots)?;
    Ok((t, nkv * hd))
}

impl InplaceOp2 for WriteKv<'_> {
    fn name(&self) -> &'static str {
        "write_kv"
    }

    fn cpu_fwd(
        &self,
        cs: &mut CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let (_, row) = check_write(self.meta, cl, sl)?;
        let slots = self.meta.slots();
        let (ca, cb) = cl.contiguous_offsets().expect("checked");
        let (sa, sb) = sl.contiguous_offsets().expect("checked");
        match (cs, ss) {
            (CpuStorage::F32(c), CpuStorage::F32(s)) => {
                copy_rows(&mut c[ca..cb], &s[sa..sb], &slots, row)
            }
            (CpuStorage::BF16(c), CpuStorage::BF16(s)) => {
                copy_rows(&mut c[ca..cb], &s[sa..sb], &slots, row)
            }
            (CpuStorage::F16(c), CpuStorage::F16(s)) => {
                copy_rows(&mut c[ca..cb], &s[sa..sb], &slots, row)
            }
            (c, s) => candle_core::bail!(
                "write_kv: cache {:?} and values {:?} on cpu are not a supported pair",
                c.dtype(),
                s.dtype()
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cs: &mut candle_core::CudaStorage,
        cl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        crate::cuda::write_kv_fwd(self.meta, cs, cl, ss, sl)
    }
}

/// Writes `src` `[T, num_kv_heads, head_dim]` (the batch's keys or values) into `cache`
/// `[num_slots, num_kv_heads, head_dim]` at each token's slot (`PagedAttentionMeta::slots`), in
/// place. CPU: f32, bf16, f16; CUDA: f32, bf16.
pub fn write_kv(cache: &Tensor, src: &Tensor, meta: &PagedAttentionMeta) -> Result<()> {
    if src.dim(0)? == 0 {
        return Ok(());
    }
    cache.inplace_op2(src, &WriteKv { meta })
}
