//! CUDA launches of the `lora_sgmv` kernels (kernels/lora_sgmv.cu).

use crate::lora_sgmv::{work_list, LoraSgmv};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, Layout, Result, Shape};

pub const LORA_SGMV_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora_sgmv.ptx"));
const MODULE: &str = "tandem_lora_sgmv";
/// Inputs per block of the shrink kernel (K_BLOCK) and the most rank rows a segment may have
/// (MAX_RANK), as in kernels/lora_sgmv.cu.
const K_BLOCK: usize = 512;
const MAX_RANK: usize = 256;
/// The tensor-core path (bf16): inputs per shrink block and the largest rank (K_BLOCK_MMA,
/// MMA_MAX_RANK in kernels/lora_sgmv.cu).
const K_BLOCK_MMA: usize = 256;
const MMA_MAX_RANK: usize = 64;

/// Route bf16 through the CUDA-core kernels even where the tensor-core ones apply (benchmarks).
pub static FORCE_CUDA_CORES: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);
/// Route bf16 through the fused cluster kernel (shrink and expand in one launch, sm_90) where it
/// applies. Off by default: on an H100 it measured slower than the two tensor-core kernels
/// (docs/benchmarks.md); kept for benchmarks and further work.
pub static USE_FUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The fused kernel's cluster size (FUSED_SPLITS in kernels/lora_sgmv.cu).
const FUSED_SPLITS: u32 = 8;

/// Whether the PTX has the sm_90 cluster kernel (built for compute capability 9.0 or later).
fn has_clusters() -> bool {
    env!("TANDEM_CUDA_CAP")
        .parse::<u32>()
        .is_ok_and(|cap| cap >= 90)
}

/// A segment list on the device: the kernels' work list (see `work_list`).
pub struct SgmvPlan {
    device: CudaDevice,
    meta: CudaSlice<i32>,
    n_tiles: usize,
    covers_all: bool,
    max_rank: usize,
    tokens: usize,
}

impl SgmvPlan {
    fn new(dev: &CudaDevice, op: &LoraSgmv, tokens: usize) -> Result<Self> {
        let max_rank = op.segs.iter().map(|s| s.rank).max().unwrap_or(0);
        if max_rank > MAX_RANK {
            candle_core::bail!("lora_sgmv: cuda supports ranks up to {MAX_RANK}, got {max_rank}")
        }
        let (meta, n_tiles, covers_all) = work_list(&op.segs, tokens);
        Ok(Self {
            device: dev.clone(),
            meta: dev.clone_htod(&meta)?,
            n_tiles,
            covers_all,
            max_rank,
            tokens,
        })
    }
}

fn contiguous<'a, T>(s: &'a CudaSlice<T>, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    super::contiguous(s, l, "lora_sgmv", what)
}

#[allow(clippy::too_many_arguments)]
fn run<T: DeviceRepr + ValidAsZeroBits>(
    suffix: &str,
    dev: &CudaDevice,
    plan: &SgmvPlan,
    x: &CudaSlice<T>,
    xl: &Layout,
    a: &CudaSlice<T>,
    al: &Layout,
    bt: &CudaSlice<T>,
    bl: &Layout,
) -> Result<CudaSlice<T>> {
    let (t, n_in) = xl.shape().dims2()?;
    let (_, n_out) = bl.shape().dims2()?;
    let x = contiguous(x, xl, "x")?;
    let a = contiguous(a, al, "a_pool")?;
    let bt = contiguous(bt, bl, "bt_pool")?;
    let y = if plan.covers_all {
        // SAFETY: the expand kernel writes every row of y when the tiles cover every token.
        unsafe { dev.alloc::<T>(t * n_out)? }
    } else {
        dev.alloc_zeros::<T>(t * n_out)?
    };
    if plan.n_tiles == 0 {
        return Ok(y);
    }
    let aligned = |l: &Layout| l.start_offset().is_multiple_of(8);
    let mma = suffix == "bf16"
        && !FORCE_CUDA_CORES.load(std::sync::atomic::Ordering::Relaxed)
        && plan.max_rank <= MMA_MAX_RANK
        && n_in % 16 == 0
        && n_out % 8 == 0
        && aligned(xl)
        && aligned(al)
        && aligned(bl);
    if mma
        && has_clusters()
        && plan.n_tiles <= 65_535
        && USE_FUSED.load(std::sync::atomic::Ordering::Relaxed)
    {
        let f = dev.get_or_load_custom_func("lora_sgmv_fused_bf16", MODULE, LORA_SGMV_PTX)?;
        let (n_in_i, n_out_i) = (n_in as i32, n_out as i32);
        let mut b = f.builder();
        b.arg(&x)
            .arg(&a)
            .arg(&bt)
            .arg(&y)
            .arg(&plan.meta)
            .arg(&n_in_i)
            .arg(&n_out_i);
        let cfg = LaunchConfig {
            grid_dim: (FUSED_SPLITS, plan.n_tiles as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x [t, n_in], the pools' rows checked against the segments (check_shapes), y
        // [t, n_out], meta as built by work_list; the kernel's cluster size divides the grid.
        unsafe { b.launch(cfg) }.w()?;
        return Ok(y);
    }
    let (kind, k_block) = if mma {
        ("mma_bf16", K_BLOCK_MMA)
    } else {
        (suffix, K_BLOCK)
    };
    let k_splits = n_in.div_ceil(k_block);
    // SAFETY: the shrink kernel writes every (split, token, rank) entry the expand kernel reads.
    let v = unsafe { dev.alloc::<f32>(k_splits * t * plan.max_rank)? };
    let (n_in_i, n_out_i, t_i, stride, splits_i) = (
        n_in as i32,
        n_out as i32,
        t as i32,
        plan.max_rank as i32,
        k_splits as i32,
    );

    let shrink =
        dev.get_or_load_custom_func(&format!("lora_shrink_{kind}"), MODULE, LORA_SGMV_PTX)?;
    let mut b = shrink.builder();
    b.arg(&x)
        .arg(&a)
        .arg(&v)
        .arg(&plan.meta)
        .arg(&n_in_i)
        .arg(&t_i)
        .arg(&stride);
    let cfg = LaunchConfig {
        grid_dim: (plan.n_tiles as u32, k_splits as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: every pointer covers the extent the kernel reads or writes: x [t, n_in]; the pools'
    // rows were checked against the segments (check_shapes); v [k_splits, t, max_rank]; meta as
    // built by work_list for these segments and t tokens.
    unsafe { b.launch(cfg) }.w()?;

    let expand =
        dev.get_or_load_custom_func(&format!("lora_expand_{kind}"), MODULE, LORA_SGMV_PTX)?;
    let mut b = expand.builder();
    b.arg(&v)
        .arg(&bt)
        .arg(&y)
        .arg(&plan.meta)
        .arg(&n_out_i)
        .arg(&t_i)
        .arg(&stride)
        .arg(&splits_i);
    let cfg = LaunchConfig {
        grid_dim: (plan.n_tiles as u32, n_out.div_ceil(256) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as above; y is [t, n_out] and each thread writes its column of its tile's rows.
    unsafe { b.launch(cfg) }.w()?;
    Ok(y)
}

pub(crate) fn lora_sgmv_fwd(
    op: &LoraSgmv,
    xs: &CudaStorage,
    xl: &Layout,
    as_: &CudaStorage,
    al: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (t, _, n_out) = crate::lora_sgmv::check_shapes(&op.segs, xl, al, bl)?;
    let dev = xs.device();
    // The cached plan serves calls on the same device with the same token count; anything else
    // gets a fresh one.
    let fresh;
    let plan = match op.plan.get() {
        Some(p) if p.device.same_device(dev) && p.tokens == t => p,
        _ => {
            let p = SgmvPlan::new(dev, op, t)?;
            match op.plan.set(p) {
                Ok(()) => op.plan.get().expect("just set"),
                Err(p) => {
                    fresh = p;
                    &fresh
                }
            }
        }
    };
    let slice = match (&xs.slice, &as_.slice, &bs.slice) {
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => {
            CudaStorageSlice::F32(run("f32", dev, plan, x, xl, a, al, b, bl)?)
        }
        (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => {
            CudaStorageSlice::BF16(run("bf16", dev, plan, x, xl, a, al, b, bl)?)
        }
        _ => candle_core::bail!(
            "lora_sgmv: cuda supports f32 and bf16 (x, a_pool and bt_pool alike), got {:?}",
            xs.dtype()
        ),
    };
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        Shape::from((t, n_out)),
    ))
}

/// Keeps the GPU busy for `cycles` clock ticks (benchmarks queue timed work behind it).
pub fn spin(dev: &CudaDevice, cycles: i64) -> Result<()> {
    let f = dev.get_or_load_custom_func("tandem_spin", MODULE, LORA_SGMV_PTX)?;
    let mut b = f.builder();
    b.arg(&cycles);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernel reads no memory.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}
