//! CUDA launches of the fused element-wise kernels (kernels/elementwise.cu).

use super::contiguous;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, Layout, Result, Shape};

pub const ELEMENTWISE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));
const MODULE: &str = "tandem_elementwise";
/// Threads per add_rms_norm block (NORM_THREADS in kernels/elementwise.cu).
const NORM_THREADS: u32 = 256;

type Arg<'a> = (&'a CudaStorage, &'a Layout);

fn norm_launch<T: DeviceRepr>(
    dev: &CudaDevice,
    suffix: &str,
    (x, xl): (&CudaSlice<T>, &Layout),
    (r, rl): (&CudaSlice<T>, &Layout),
    (w, wl): (&CudaSlice<T>, &Layout),
    eps: f32,
) -> Result<CudaSlice<T>> {
    let (rows, hidden) = xl.shape().dims2()?;
    if rl.shape() != xl.shape() || wl.shape().dims() != [hidden] {
        candle_core::bail!(
            "add_rms_norm: x {:?}, r {:?}, w {:?}",
            xl.shape(),
            rl.shape(),
            wl.shape()
        )
    }
    let x = contiguous(x, xl, "add_rms_norm", "x")?;
    let r = contiguous(r, rl, "add_rms_norm", "r")?;
    let w = contiguous(w, wl, "add_rms_norm", "w")?;
    // SAFETY: one block per row writes the row's sum and normed values (every element).
    let out = unsafe { dev.alloc::<T>(2 * rows * hidden)? };
    let f =
        dev.get_or_load_custom_func(&format!("add_rms_norm_{suffix}"), MODULE, ELEMENTWISE_PTX)?;
    let (rows_i, hidden_i) = (rows as i32, hidden as i32);
    let mut b = f.builder();
    b.arg(&x)
        .arg(&r)
        .arg(&w)
        .arg(&out)
        .arg(&rows_i)
        .arg(&hidden_i)
        .arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (NORM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x and r hold rows * hidden elements, w hidden, out 2 * rows * hidden.
    if rows > 0 {
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(out)
}

pub(crate) fn add_rms_norm_fwd(eps: f32, x: Arg, r: Arg, w: Arg) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device().clone();
    let (rows, hidden) = x.1.shape().dims2()?;
    let slice = match (&x.0.slice, &r.0.slice, &w.0.slice) {
        (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b), CudaStorageSlice::F32(c)) => {
            CudaStorageSlice::F32(norm_launch(&dev, "f32", (a, x.1), (b, r.1), (c, w.1), eps)?)
        }
        (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b), CudaStorageSlice::BF16(c)) => {
            CudaStorageSlice::BF16(norm_launch(
                &dev,
                "bf16",
                (a, x.1),
                (b, r.1),
                (c, w.1),
                eps,
            )?)
        }
        _ => candle_core::bail!(
            "add_rms_norm: cuda takes f32 or bf16 (x, r and w alike), got {:?}",
            x.0.dtype()
        ),
    };
    Ok((
        CudaStorage { slice, device: dev },
        Shape::from((2, rows, hidden)),
    ))
}

fn swiglu_launch<T: DeviceRepr>(
    dev: &CudaDevice,
    suffix: &str,
    (g, gl): (&CudaSlice<T>, &Layout),
    (u, ul): (&CudaSlice<T>, &Layout),
) -> Result<CudaSlice<T>> {
    if gl.shape() != ul.shape() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gl.shape(),
            ul.shape()
        )
    }
    let n = gl.shape().elem_count();
    let g = contiguous(g, gl, "swiglu", "gate")?;
    let u = contiguous(u, ul, "swiglu", "up")?;
    // SAFETY: the grid-stride loop writes every element.
    let out = unsafe { dev.alloc::<T>(n)? };
    let f = dev.get_or_load_custom_func(&format!("swiglu_{suffix}"), MODULE, ELEMENTWISE_PTX)?;
    let n_i = n as i64;
    let mut b = f.builder();
    b.arg(&g).arg(&u).arg(&out).arg(&n_i);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: g, u and out hold n elements.
    if n > 0 {
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(out)
}

pub(crate) fn swiglu_fwd(g: Arg, u: Arg) -> Result<(CudaStorage, Shape)> {
    let dev = g.0.device().clone();
    let slice = match (&g.0.slice, &u.0.slice) {
        (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => {
            CudaStorageSlice::F32(swiglu_launch(&dev, "f32", (a, g.1), (b, u.1))?)
        }
        (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => {
            CudaStorageSlice::BF16(swiglu_launch(&dev, "bf16", (a, g.1), (b, u.1))?)
        }
        _ => candle_core::bail!(
            "swiglu: cuda takes f32 or bf16 (gate and up alike), got {:?}",
            g.0.dtype()
        ),
    };
    Ok((CudaStorage { slice, device: dev }, g.1.shape().clone()))
}
