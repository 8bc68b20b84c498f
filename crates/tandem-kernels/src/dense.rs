//! Batch-invariant dense products on the CPU: `y = x · wᵀ` for f32 `x` [m, k] and `w` [n, k]
//! (a linear layer's weight as stored), each output element summed in one fixed order that
//! depends only on `k` — never on `m`, on the row's place in the batch, or on the threads.
//!
//! Why not candle's CPU matmul (the gemm crate): gemm picks its kernel and its k-blocking from
//! the problem's shape — one row takes a matrix-vector path, few rows × columns a horizontal
//! kernel, ≤ 64 × 64 a 512-wide k block — so the last bits of a token's activations changed
//! with how many tokens were multiplied with it: a prompt prefilled whole, in chunks, after a
//! cached prefix or decoded token by token gave logprobs ~5e-7 apart, and a request's output
//! depended on what else shared its iteration. With this product every token's row is the
//! same bits whichever way it is batched (prefix caching on and off, chunked prefill, co-served
//! training rows beside it).
//!
//! The order ("canonical"): sixteen lanes, lane `j` accumulating `x[i]·w[i]` for `i ≡ j (mod
//! 16)` in increasing `i` with fused multiply-adds from +0 (a last, partial group of `k % 16`
//! feeds only the first lanes), then the lanes summed as a fixed tree: `s8[j] = a[j] + a[j+8]`, `s4[j] = s8[j] +
//! s8[j+4]`, `s2[j] = s4[j] + s4[j+2]`, `s2[0] + s2[1]`. `dot_canonical` is that order written
//! plainly; the AVX-512 tile and the portable tile (AVX2 + FMA where the CPU has them) compute
//! exactly it, so every machine gets the same bits from every path.
//!
//! Speed: dot-product tiles of R rows × C weight rows read both operands as stored (no packing
//! of the weight, which gemm does per call for small batches), so decode and small batches are
//! memory-bound on one pass over the weight; large products run near gemm's speed.

use crate::cpu::contiguous_f32;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const LANES: usize = 16;
/// Multiply-adds below which a product runs on the calling thread.
const SERIAL_WORK: usize = 1 << 18;

/// `x · wᵀ` ([m, k] · [n, k]ᵀ → [m, n]). On the CPU in f32 (any leading dims of `x`), the
/// batch-invariant product of this module; elsewhere candle's matmul.
pub fn dense(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32;
    if !cpu_f32 || w.rank() != 2 {
        return x.broadcast_matmul(&w.t()?);
    }
    let dims = x.dims().to_vec();
    let Some((&k, lead)) = dims.split_last() else {
        candle_core::bail!("dense: x must have at least one dimension")
    };
    let m: usize = lead.iter().product();
    let y = x
        .reshape((m, k))?
        .contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &Dense)?;
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    y.reshape(out)
}

/// `Σ x[i]·w[i]` in the canonical order (the module's header). The reference every fast path
/// equals bit for bit.
pub fn dot_canonical(x: &[f32], w: &[f32]) -> f32 {
    let mut a = [0f32; LANES];
    for (i, (xi, wi)) in x.iter().zip(w).enumerate() {
        a[i % LANES] = xi.mul_add(*wi, a[i % LANES]);
    }
    reduce(&a)
}

#[inline(always)]
fn reduce(a: &[f32; LANES]) -> f32 {
    let s8: [f32; 8] = std::array::from_fn(|j| a[j] + a[j + 8]);
    let s4: [f32; 4] = std::array::from_fn(|j| s8[j] + s8[j + 4]);
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

struct Dense;

impl CustomOp2 for Dense {
    fn name(&self) -> &'static str {
        "dense"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, wk) = wl.shape().dims2()?;
        if wk != k {
            candle_core::bail!(
                "dense: x {:?} and w {:?} do not fit",
                xl.shape(),
                wl.shape()
            )
        }
        let x = contiguous_f32(xs, xl, "dense", "x")?;
        let w = contiguous_f32(ws, wl, "dense", "w")?;
        Ok((CpuStorage::F32(product(x, w, m, n, k)), Shape::from((m, n))))
    }
}

/// Rows × columns of one parallel task: both operand blocks together about half of a 1 MiB
/// L2, so that a task streams its weight rows once from memory and its rows from cache.
fn blocks(m: usize, n: usize, k: usize) -> (usize, usize) {
    let per = ((128 * 1024) / (4 * k.max(1))).clamp(8, 256) / 8 * 8;
    let rb = per.min(m.max(1));
    // Enough column blocks for every thread even when there are few rows (decode).
    let threads = rayon::current_num_threads().max(1);
    let row_tasks = m.div_ceil(rb);
    let want_cols = (4 * threads).div_ceil(row_tasks).max(1);
    let cb = per.min(n.div_ceil(want_cols).next_multiple_of(8)).max(8);
    (rb, cb)
}

/// The whole product, `y` [m, n] row-major.
pub(crate) fn product(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    let (rb, cb) = blocks(m, n, k);
    let tasks: Vec<(usize, usize)> = (0..m.div_ceil(rb))
        .flat_map(|r| (0..n.div_ceil(cb)).map(move |c| (r * rb, c * cb)))
        .collect();
    let kernel = Kernel::best();
    let task = |&(r0, c0): &(usize, usize)| {
        let (rows, cols) = (rb.min(m - r0), cb.min(n - c0));
        let mut out = vec![0f32; rows * cols];
        kernel.block(
            &x[r0 * k..(r0 + rows) * k],
            &w[c0 * k..(c0 + cols) * k],
            k,
            &mut out,
        );
        out
    };
    // Waking the pool costs more than a small product (a decode step's k/v projection).
    let parts: Vec<Vec<f32>> = if m * n * k <= SERIAL_WORK {
        tasks.iter().map(task).collect()
    } else {
        tasks.par_iter().map(task).collect()
    };
    for (&(r0, c0), part) in tasks.iter().zip(&parts) {
        let cols = cb.min(n - c0);
        for (r, row) in part.chunks_exact(cols).enumerate() {
            y[(r0 + r) * n + c0..][..cols].copy_from_slice(row);
        }
    }
    y
}

/// Which tile code this CPU runs (chosen once per call from the CPU's features, never from
/// the shape: every path computes the canonical order).
#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// `out` [rows, cols] = x [rows, k] · w [cols, k]ᵀ, in tiles of R × C.
    fn block(self, x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
        let rows = x.len() / k.max(1);
        let cols = out.len().checked_div(rows).unwrap_or(0);
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: chosen by `best` only where the CPU has AVX-512F.
            Kernel::Avx512 => unsafe { crate::dense_x86::block_avx512(x, w, k, rows, cols, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: chosen by `best` only where the CPU has AVX2 and FMA.
            Kernel::Avx2 => unsafe { block_avx2(x, w, k, rows, cols, out) },
            Kernel::Portable => block_portable(x, w, k, rows, cols, out),
        }
    }
}

/// Tiles of 2 rows × 2 weight rows in plain code: sixteen-lane accumulators the compiler keeps
/// in vector registers (two AVX2 registers each where compiled for AVX2).
#[inline(always)]
fn block_portable(x: &[f32], w: &[f32], k: usize, rows: usize, cols: usize, out: &mut [f32]) {
    let full = k / LANES * LANES;
    for c0 in (0..cols).step_by(2) {
        let nc = 2.min(cols - c0);
        for r0 in (0..rows).step_by(2) {
            let nr = 2.min(rows - r0);
            let mut acc = [[[0f32; LANES]; 2]; 2];
            let xr = |r: usize| &x[(r0 + r.min(nr - 1)) * k..][..k];
            let wr = |c: usize| &w[(c0 + c.min(nc - 1)) * k..][..k];
            let (x0, x1, w0, w1) = (xr(0), xr(1), wr(0), wr(1));
            for i in (0..full).step_by(LANES) {
                let (a0, a1) = (&x0[i..i + LANES], &x1[i..i + LANES]);
                let (b0, b1) = (&w0[i..i + LANES], &w1[i..i + LANES]);
                for j in 0..LANES {
                    acc[0][0][j] = a0[j].mul_add(b0[j], acc[0][0][j]);
                    acc[0][1][j] = a0[j].mul_add(b1[j], acc[0][1][j]);
                    acc[1][0][j] = a1[j].mul_add(b0[j], acc[1][0][j]);
                    acc[1][1][j] = a1[j].mul_add(b1[j], acc[1][1][j]);
                }
            }
            for i in full..k {
                let j = i - full;
                acc[0][0][j] = x0[i].mul_add(w0[i], acc[0][0][j]);
                acc[0][1][j] = x0[i].mul_add(w1[i], acc[0][1][j]);
                acc[1][0][j] = x1[i].mul_add(w0[i], acc[1][0][j]);
                acc[1][1][j] = x1[i].mul_add(w1[i], acc[1][1][j]);
            }
            for (r, acc_r) in acc.iter().enumerate().take(nr) {
                for (c, a) in acc_r.iter().enumerate().take(nc) {
                    out[(r0 + r) * cols + c0 + c] = reduce(a);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_avx2(x: &[f32], w: &[f32], k: usize, rows: usize, cols: usize, out: &mut [f32]) {
    block_portable(x, w, k, rows, cols, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tile code this CPU can run.
    fn kernels() -> Vec<Kernel> {
        let mut v = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                v.push(Kernel::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Kernel::Avx512);
            }
        }
        v
    }

    #[test]
    fn every_tile_code_computes_the_canonical_order_bit_for_bit() {
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for &(rows, cols, k) in &[(1, 1, 1), (5, 7, 15), (4, 4, 16), (3, 9, 33), (9, 6, 100)] {
            let x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..cols * k).map(|_| next()).collect();
            let want: Vec<f32> = (0..rows * cols)
                .map(|e| dot_canonical(&x[e / cols * k..][..k], &w[e % cols * k..][..k]))
                .collect();
            for kernel in kernels() {
                let mut out = vec![f32::NAN; rows * cols];
                kernel.block(&x, &w, k, &mut out);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&out), bits(&want), "{rows}x{cols}x{k}");
            }
        }
    }
}
