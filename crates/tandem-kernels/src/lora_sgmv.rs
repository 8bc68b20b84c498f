//! Batched multi-LoRA over a packed batch (SGMV semantics, after Punica and S-LoRA):
//! for each segment with an adapter, `y[seg] = scale * (x[seg] · Aᵀ) · B`ᵀ, where the adapter's
//! A rows and Bᵀ rows sit in per-projection pools at the segment's `row_offset`, `rank` rows
//! each. Segments without an adapter are simply not listed; their rows of `y` are zero.
//! Ranks may differ between segments: each segment computes with its own rank (no padding).
//!
//! Pools: `a_pool` [rows, in] holds A (lora_A, [r, in]) row blocks; `bt_pool` [rows, out] holds
//! Bᵀ (lora_B is [out, r]) row blocks. The CPU path is the reference.

use crate::cpu::dot;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// One segment of the packed batch that runs through an adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraSegment {
    /// First token of the segment in the batch.
    pub start: usize,
    pub len: usize,
    /// First row of the adapter's block in the pools.
    pub row_offset: usize,
    pub rank: usize,
    /// alpha / r (or alpha / sqrt(r) with rsLoRA).
    pub scale: f32,
}

/// (tokens, in, out) after checking that x, the pools and the segments fit together.
pub(crate) fn check_shapes(
    segs: &[LoraSegment],
    xl: &Layout,
    al: &Layout,
    bl: &Layout,
) -> Result<(usize, usize, usize)> {
    let (t, n_in) = xl.shape().dims2()?;
    let (rows, a_in) = al.shape().dims2()?;
    let (b_rows, n_out) = bl.shape().dims2()?;
    if a_in != n_in || b_rows != rows {
        candle_core::bail!(
            "lora_sgmv: x {:?}, a_pool {:?}, bt_pool {:?} do not fit",
            xl.shape(),
            al.shape(),
            bl.shape()
        )
    }
    check(segs, t, rows)?;
    Ok((t, n_in, n_out))
}

fn check(segs: &[LoraSegment], t: usize, rows: usize) -> Result<()> {
    for s in segs {
        if s.start + s.len > t {
            candle_core::bail!(
                "lora_sgmv: segment {}..{} outside {t} tokens",
                s.start,
                s.start + s.len
            )
        }
        if s.row_offset + s.rank > rows {
            candle_core::bail!(
                "lora_sgmv: rows {}..{} outside a pool of {rows}",
                s.row_offset,
                s.row_offset + s.rank
            )
        }
    }
    Ok(())
}

/// Tokens per work tile of the CUDA kernels (TILE_T in kernels/lora_sgmv.cu).
pub const TILE_TOKENS: usize = 8;

/// The CUDA kernels' work list: per tile of at most [`TILE_TOKENS`] tokens of one segment,
/// `(first token, tokens, first pool row, rank)` then `(scale bits, 0, 0, 0)`; with the number of
/// tiles and whether the tiles cover every one of the `t` tokens.
pub fn work_list(segs: &[LoraSegment], t: usize) -> (Vec<i32>, usize, bool) {
    let mut meta = Vec::new();
    let mut covered = 0;
    for s in segs {
        covered += s.len;
        for start in (s.start..s.start + s.len).step_by(TILE_TOKENS) {
            let n = TILE_TOKENS.min(s.start + s.len - start);
            meta.extend([
                start as i32,
                n as i32,
                s.row_offset as i32,
                s.rank as i32,
                s.scale.to_bits() as i32,
                0,
                0,
                0,
            ]);
        }
    }
    let n_tiles = meta.len() / 8;
    (meta, n_tiles, covered == t)
}

pub(crate) struct LoraSgmv {
    pub(crate) segs: Arc<[LoraSegment]>,
    /// The work list on the device, uploaded on the first CUDA call and reused by later calls of
    /// the same op (one upload per batch when the op is applied to every layer).
    #[cfg(feature = "cuda")]
    pub(crate) plan: std::sync::OnceLock<crate::cuda::SgmvPlan>,
}

fn f32_slice<'s>(s: &'s CpuStorage, l: &Layout, what: &str) -> Result<&'s [f32]> {
    let CpuStorage::F32(d) = s else {
        candle_core::bail!("lora_sgmv: {what} must be f32 on cpu, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&d[a..b]),
        None => candle_core::bail!("lora_sgmv: {what} must be contiguous"),
    }
}

/// One token's `y += scale · (x Aᵀ) Bᵀ` for its adapter's rows `a` [rank, in] and `b` (Bᵀ,
/// [rank, out]): per rank row, one entry of the shrink, then the expand along that row of Bᵀ.
/// Memory-bound on A and Bᵀ (each read once per token), so it streams them in order.
#[inline(always)]
fn cpu_row(x: &[f32], a: &[f32], b: &[f32], scale: f32, y: &mut [f32]) {
    let (n_in, n_out) = (x.len(), y.len());
    for (r, (arow, brow)) in a.chunks_exact(n_in).zip(b.chunks_exact(n_out)).enumerate() {
        // The next rows of A and Bᵀ are read right after this one: ask for them now, so that
        // their first lines are not waited on (each row is a few KB, too short for the
        // hardware prefetchers to get ahead of the reads).
        if let Some(next) = a.get((r + 1) * n_in..(r + 2) * n_in) {
            prefetch(next);
        }
        if let Some(next) = b.get((r + 1) * n_out..(r + 2) * n_out) {
            prefetch(next);
        }
        if r == 0 {
            prefetch(brow);
        }
        let h = dot(x, arow) * scale;
        y.iter_mut().zip(brow).for_each(|(o, w)| *o += h * w);
    }
}

/// Hints that `s` is about to be read (one prefetch per 64-byte line; a no-op off x86_64).
#[inline(always)]
fn prefetch(s: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for i in (0..s.len()).step_by(16) {
        // SAFETY: a prefetch hint has no effect on memory or program state; the address is
        // inside `s`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                s.as_ptr().add(i) as *const i8
            )
        }
    }
}

/// `cpu_row` compiled for AVX2 + FMA, used where the CPU has them (checked at run time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn cpu_row_avx2(x: &[f32], a: &[f32], b: &[f32], scale: f32, y: &mut [f32]) {
    cpu_row(x, a, b, scale, y)
}

fn cpu_row_best(x: &[f32], a: &[f32], b: &[f32], scale: f32, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function was compiled for (checked just above).
        return unsafe { cpu_row_avx2(x, a, b, scale, y) };
    }
    cpu_row(x, a, b, scale, y)
}

impl CustomOp3 for LoraSgmv {
    fn name(&self) -> &'static str {
        "lora_sgmv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (t, n_in, n_out) = check_shapes(&self.segs, xl, al, bl)?;
        let x = f32_slice(xs, xl, "x")?;
        let a = f32_slice(as_, al, "a_pool")?;
        let b = f32_slice(bs, bl, "bt_pool")?;
        let mut y = vec![0f32; t * n_out];
        // Token -> segment, so that rows of y can be computed in parallel.
        let mut seg_of = vec![usize::MAX; t];
        for (i, s) in self.segs.iter().enumerate() {
            seg_of[s.start..s.start + s.len]
                .iter_mut()
                .for_each(|v| *v = i);
        }
        y.par_chunks_mut(n_out).enumerate().for_each(|(tok, yrow)| {
            let Some(s) = self.segs.get(seg_of[tok]) else {
                return;
            };
            let xrow = &x[tok * n_in..(tok + 1) * n_in];
            let rows = s.row_offset..s.row_offset + s.rank;
            let a = &a[rows.start * n_in..rows.end * n_in];
            let b = &b[rows.start * n_out..rows.end * n_out];
            cpu_row_best(xrow, a, b, s.scale, yrow);
        });
        Ok((CpuStorage::F32(y), Shape::from((t, n_out))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        as_: &candle_core::CudaStorage,
        al: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::lora_sgmv_fwd(self, xs, xl, as_, al, bs, bl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a_pool: &Tensor,
        bt_pool: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, da, dbt) = lora_sgmv_backward(x, a_pool, bt_pool, dy, &self.segs)?;
        Ok((Some(dx), Some(da), Some(dbt)))
    }
}

/// `scale · (x Aᵀ) Bᵀ` per listed segment, as a [T, out] tensor (zero rows elsewhere).
/// Differentiable in all three inputs (candle autograd calls `lora_sgmv_backward`).
pub fn lora_sgmv(
    x: &Tensor,
    a_pool: &Tensor,
    bt_pool: &Tensor,
    segs: Arc<[LoraSegment]>,
) -> Result<Tensor> {
    x.apply_op3_arc(a_pool, bt_pool, lora_sgmv_op(segs))
}

/// The op itself, to apply many times over the same segments with
/// `x.apply_op3_arc(a_pool, bt_pool, op.clone())`: on CUDA the segment list is uploaded once.
pub fn lora_sgmv_op(segs: Arc<[LoraSegment]>) -> Arc<Box<dyn CustomOp3 + Send + Sync>> {
    Arc::new(Box::new(LoraSgmv {
        segs,
        #[cfg(feature = "cuda")]
        plan: std::sync::OnceLock::new(),
    }))
}

/// Gradients of `lora_sgmv` for upstream gradient `dy` [T, out]: (dx [T, in], d a_pool, d bt_pool),
/// built from plain candle ops so that it runs on any device. Per segment, with h = x Aᵀ:
/// dBᵀ = scale · hᵀ dy, dh = scale · dy (Bᵀ)ᵀ, dA = dhᵀ x, dx = dh A.
pub fn lora_sgmv_backward(
    x: &Tensor,
    a_pool: &Tensor,
    bt_pool: &Tensor,
    dy: &Tensor,
    segs: &[LoraSegment],
) -> Result<(Tensor, Tensor, Tensor)> {
    let (t, _) = x.dims2()?;
    check(segs, t, a_pool.dims2()?.0)?;
    let mut dx = x.zeros_like()?;
    let mut da = a_pool.zeros_like()?;
    let mut dbt = bt_pool.zeros_like()?;
    for s in segs {
        let xs = x.narrow(0, s.start, s.len)?;
        let dys = dy.narrow(0, s.start, s.len)?;
        let a = a_pool.narrow(0, s.row_offset, s.rank)?;
        let bt = bt_pool.narrow(0, s.row_offset, s.rank)?;
        let h = xs.matmul(&a.t()?)?;
        let d_bt = (h.t()?.matmul(&dys)? * s.scale as f64)?;
        let dh = (dys.matmul(&bt.t()?)? * s.scale as f64)?;
        let d_a = dh.t()?.matmul(&xs)?;
        let d_x = dh.matmul(&a)?;
        dx = dx.slice_scatter0(&(dx.narrow(0, s.start, s.len)? + d_x)?, s.start)?;
        da = da.slice_scatter0(&(da.narrow(0, s.row_offset, s.rank)? + d_a)?, s.row_offset)?;
        dbt = dbt.slice_scatter0(
            &(dbt.narrow(0, s.row_offset, s.rank)? + d_bt)?,
            s.row_offset,
        )?;
    }
    Ok((dx, da, dbt))
}
