//! Small CPU helpers the ops' CPU paths share.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

/// The f32 data `l` describes in `s`; an error naming `op` and `what` if `s` is not f32 or `l`
/// is not contiguous.
pub(crate) fn contiguous_f32<'s>(
    s: &'s CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<&'s [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{op}: {what} must be f32 on cpu, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: {what} must be contiguous"),
    }
}

/// `a · b` with eight independent accumulators, so that the compiler can keep them in SIMD lanes
/// (a single running sum must keep the sequential order of float additions). Inlined into its
/// callers, so a caller compiled for AVX2 gets an AVX2 loop.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}
