//! Fused element-wise ops of the Llama forward (kernels/elementwise.cu): the residual add with
//! the RMSNorm after it, and SwiGLU's `silu(gate) * up`, each one kernel on CUDA where candle
//! launches two and stores the intermediate.
//!
//! The CPU implementations are the references (f32, float64 accumulation) the tests and the
//! kernel emulator check against; the model keeps candle's ops on the CPU (their bits are what
//! its CPU tests pin), and `fused_supported` says where the fused kernels run.

use crate::cpu::contiguous_f32;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

/// Whether the fused kernels run for this device and dtype (CUDA, f32 or bf16).
pub fn fused_supported(device: &Device, dtype: DType) -> bool {
    cfg!(feature = "cuda") && device.is_cuda() && matches!(dtype, DType::F32 | DType::BF16)
}

/// `(x + r, rms_norm(x + r) * w)` for `x`, `r` `[.., hidden]` and `w` `[hidden]`: the sum is
/// rounded to the element type before the norm reads it, as a separate add would store it.
pub fn add_rms_norm(x: &Tensor, r: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let dims = x.dims().to_vec();
    let hidden = *dims
        .last()
        .ok_or_else(|| candle_core::Error::Msg("add_rms_norm: x has no dimensions".into()))?;
    if r.dims() != dims.as_slice() || w.dims() != [hidden] {
        candle_core::bail!(
            "add_rms_norm: x {:?}, r {:?}, w {:?} do not fit together",
            x.shape(),
            r.shape(),
            w.shape()
        )
    }
    let rows = x.elem_count() / hidden.max(1);
    let x2 = x.reshape((rows, hidden))?.contiguous()?;
    let r2 = r.reshape((rows, hidden))?.contiguous()?;
    let both = x2.apply_op3_no_bwd(&r2, &w.contiguous()?, &AddRmsNorm { eps })?;
    Ok((
        both.get(0)?.reshape(dims.clone())?,
        both.get(1)?.reshape(dims)?,
    ))
}

/// `silu(g) * u` (`g / (1 + exp(-g)) * u`), computed in f32 and rounded once.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.shape() != u.shape() {
        candle_core::bail!("swiglu: gate {:?} and up {:?} differ", g.shape(), u.shape())
    }
    g.contiguous()?.apply_op2_no_bwd(&u.contiguous()?, &Swiglu)
}

pub(crate) struct AddRmsNorm {
    pub(crate) eps: f32,
}

pub(crate) struct Swiglu;

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add_rms_norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, hidden) = xl.shape().dims2()?;
        let x = contiguous_f32(xs, xl, "add_rms_norm", "x")?;
        let r = contiguous_f32(rs, rl, "add_rms_norm", "r")?;
        let w = contiguous_f32(ws, wl, "add_rms_norm", "w")?;
        let mut out = vec![0f32; 2 * rows * hidden];
        let (sums, normed) = out.split_at_mut(rows * hidden);
        for (row, (s, n)) in sums
            .chunks_mut(hidden)
            .zip(normed.chunks_mut(hidden))
            .enumerate()
        {
            let base = row * hidden;
            for (i, v) in s.iter_mut().enumerate() {
                *v = x[base + i] + r[base + i];
            }
            let sq: f64 = s.iter().map(|&v| v as f64 * v as f64).sum();
            let inv = 1.0 / (sq / hidden as f64 + self.eps as f64).sqrt();
            for ((o, &v), &wi) in n.iter_mut().zip(s.iter()).zip(w) {
                *o = (v as f64 * inv * wi as f64) as f32;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((2, rows, hidden))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        rs: &candle_core::CudaStorage,
        rl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::add_rms_norm_fwd(self.eps, (xs, xl), (rs, rl), (ws, wl))
    }
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(gs, gl, "swiglu", "gate")?;
        let u = contiguous_f32(us, ul, "swiglu", "up")?;
        let out = g
            .iter()
            .zip(u)
            .map(|(&g, &u)| {
                let g = g as f64;
                (g / (1.0 + (-g).exp()) * u as f64) as f32
            })
            .collect();
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::swiglu_fwd((gs, gl), (us, ul))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // A fixed pseudo-random fill (no device RNG: the same numbers on every machine).
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("shape fits")
    }

    #[test]
    fn add_rms_norm_equals_float64() -> Result<()> {
        let (x, r, w) = (
            randn(&[2, 3, 37], 1),
            randn(&[2, 3, 37], 2),
            randn(&[37], 3),
        );
        let (sum, normed) = add_rms_norm(&x, &r, &w, 1e-5)?;
        assert_eq!(sum.dims(), &[2, 3, 37]);
        let want_sum = (&x + &r)?;
        assert_eq!(
            sum.flatten_all()?.to_vec1::<f32>()?,
            want_sum.flatten_all()?.to_vec1::<f32>()?
        );
        let s = want_sum.flatten_all()?.to_vec1::<f32>()?;
        let w = w.to_vec1::<f32>()?;
        let got = normed.flatten_all()?.to_vec1::<f32>()?;
        for (row, (sr, gr)) in s.chunks(37).zip(got.chunks(37)).enumerate() {
            let ms: f64 = sr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 37.0;
            for i in 0..37 {
                let want = sr[i] as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
                assert!(
                    (gr[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "row {row} {i}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn swiglu_equals_float64() -> Result<()> {
        let (g, u) = (randn(&[5, 11], 4), randn(&[5, 11], 5));
        let got = swiglu(&g, &u)?.flatten_all()?.to_vec1::<f32>()?;
        let (g, u) = (
            g.flatten_all()?.to_vec1::<f32>()?,
            u.flatten_all()?.to_vec1::<f32>()?,
        );
        for i in 0..g.len() {
            let gv = g[i] as f64;
            let want = gv / (1.0 + (-gv).exp()) * u[i] as f64;
            assert!((got[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0));
        }
        Ok(())
    }

    #[test]
    fn bad_shapes_are_refused() {
        let x = randn(&[2, 8], 1);
        assert!(add_rms_norm(&x, &randn(&[2, 7], 2), &randn(&[8], 3), 1e-5).is_err());
        assert!(add_rms_norm(&x, &randn(&[2, 8], 2), &randn(&[7], 3), 1e-5).is_err());
        assert!(swiglu(&x, &randn(&[8, 2], 2)).is_err());
    }
}
