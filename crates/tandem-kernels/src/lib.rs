//! tandem-kernels: the compute ops tandem adds to candle.
//!
//! Owns: each op as one type with a CPU reference (`cpu_fwd`) and, behind the `cuda` feature,
//! a CUDA path (kernels/*.cu compiled to PTX by build.rs). Ops take varlen metadata as
//! explicit host data; and, for the CPU training layer that works on host buffers, products
//! and element-wise routines on slices (`matmul`, `vexp`), run from a rayon worker (`pool`).
//! Must not touch: model structure, scheduling policy, or request state.

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dense;
#[cfg(target_arch = "x86_64")]
mod dense_x86;
pub mod elementwise;
pub mod key_splits;
pub mod lora_sgmv;
pub mod matmul;
#[cfg(target_arch = "x86_64")]
mod matmul_x86;
pub mod paged_attention;
pub mod pool;
pub mod vexp;

pub use dense::dense;
pub use elementwise::{add_rms_norm, fused_supported, swiglu};
pub use lora_sgmv::{lora_sgmv, lora_sgmv_backward, lora_sgmv_op, LoraSegment};
pub use paged_attention::{
    paged_attention, paged_attention_supported, work_list, write_kv, PagedAttentionMeta, WorkItem,
};
