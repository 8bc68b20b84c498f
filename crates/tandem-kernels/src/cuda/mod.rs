//! CUDA launches of tandem's kernels (kernels/*.cu, compiled to PTX by build.rs), one file per op.

mod elementwise;
mod lora_sgmv;
mod paged_attention;

pub use elementwise::ELEMENTWISE_PTX;
pub(crate) use elementwise::{add_rms_norm_fwd, swiglu_fwd};
pub(crate) use lora_sgmv::{lora_sgmv_fwd, SgmvPlan};
pub use lora_sgmv::{spin, FORCE_CUDA_CORES, LORA_SGMV_PTX, USE_FUSED};
pub(crate) use paged_attention::{paged_attention_fwd, write_kv_fwd, AttentionPlans};

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::{Layout, Result};

/// The contiguous part of `s` that `l` describes; an error naming `op` and `what` otherwise.
pub(crate) fn contiguous<'a, T>(
    s: &'a CudaSlice<T>,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.slice(a..b)),
        None => candle_core::bail!("{op}: {what} must be contiguous"),
    }
}
