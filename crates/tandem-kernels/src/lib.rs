//! tandem-kernels: the compute ops tandem adds to candle.
//!
//! Owns: each op as one type with a CPU reference (`cpu_fwd`) and, behind the `cuda` feature,
//! a CUDA path (kernels/*.cu compiled to PTX). Ops take varlen metadata as explicit host data.
//! Must not touch: model structure, scheduling policy, or any request state.

pub mod paged_attention;

pub use paged_attention::{paged_attention, PagedAttentionMeta};
