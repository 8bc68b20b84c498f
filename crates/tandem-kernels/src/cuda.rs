//! CUDA launches of tandem's kernels (PTX built from kernels/*.cu by build.rs).

use crate::lora_sgmv::LoraSegment;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, Layout, Result, Shape};

pub const LORA_SGMV_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora_sgmv.ptx"));

fn contiguous<'a, T>(
    s: &'a CudaSlice<T>,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.slice(a..b)),
        None => candle_core::bail!("lora_sgmv: {what} must be contiguous"),
    }
}

#[allow(clippy::too_many_arguments)]
fn run<T: DeviceRepr + ValidAsZeroBits>(
    suffix: &str,
    dev: &CudaDevice,
    segs: &[LoraSegment],
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
    let mut token_seg = vec![-1i32; t];
    for (i, s) in segs.iter().enumerate() {
        token_seg[s.start..s.start + s.len]
            .iter_mut()
            .for_each(|v| *v = i as i32);
    }
    let row_offset: Vec<i32> = segs.iter().map(|s| s.row_offset as i32).collect();
    let rank: Vec<i32> = segs.iter().map(|s| s.rank as i32).collect();
    let scale: Vec<f32> = segs.iter().map(|s| s.scale).collect();
    let max_rank = segs.iter().map(|s| s.rank).max().unwrap_or(1).max(1);
    let y = dev.alloc_zeros::<T>(t * n_out)?;
    if segs.is_empty() || t == 0 {
        return Ok(y);
    }
    let token_seg = dev.clone_htod(&token_seg)?;
    let row_offset = dev.clone_htod(&row_offset)?;
    let rank = dev.clone_htod(&rank)?;
    let scale = dev.clone_htod(&scale)?;
    let h = dev.alloc_zeros::<f32>(t * max_rank)?;
    let (n_in, n_out_i, max_rank_i) = (n_in as i32, n_out as i32, max_rank as i32);

    let shrink = dev.get_or_load_custom_func(
        &format!("lora_shrink_{suffix}"),
        "tandem_lora_sgmv",
        LORA_SGMV_PTX,
    )?;
    let mut b = shrink.builder();
    b.arg(&x)
        .arg(&a)
        .arg(&h)
        .arg(&token_seg)
        .arg(&row_offset)
        .arg(&rank)
        .arg(&scale)
        .arg(&n_in)
        .arg(&max_rank_i);
    let cfg = LaunchConfig {
        grid_dim: (t as u32, max_rank as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: every pointer covers the extent the kernel reads or writes: x [t, n_in], a and bt
    // pools checked against the segments' rows by the caller, h [t, max_rank], metadata [segs].
    unsafe { b.launch(cfg) }.w()?;

    let expand = dev.get_or_load_custom_func(
        &format!("lora_expand_{suffix}"),
        "tandem_lora_sgmv",
        LORA_SGMV_PTX,
    )?;
    let mut b = expand.builder();
    b.arg(&h)
        .arg(&bt)
        .arg(&y)
        .arg(&token_seg)
        .arg(&row_offset)
        .arg(&rank)
        .arg(&n_out_i)
        .arg(&max_rank_i);
    let cfg = LaunchConfig {
        grid_dim: (t as u32, n_out.div_ceil(256) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as above; y is [t, n_out] and each thread writes one element of it.
    unsafe { b.launch(cfg) }.w()?;
    Ok(y)
}

pub fn lora_sgmv_fwd(
    segs: &[LoraSegment],
    xs: &CudaStorage,
    xl: &Layout,
    as_: &CudaStorage,
    al: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (t, _, n_out) = crate::lora_sgmv::check_shapes(segs, xl, al, bl)?;
    let dev = xs.device();
    let slice = match (&xs.slice, &as_.slice, &bs.slice) {
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => {
            CudaStorageSlice::F32(run("f32", dev, segs, x, xl, a, al, b, bl)?)
        }
        (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => {
            CudaStorageSlice::BF16(run("bf16", dev, segs, x, xl, a, al, b, bl)?)
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
