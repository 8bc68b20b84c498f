//! Plain f32 products on host slices, for CPU code that works on its own buffers rather than
//! candle tensors (the hand-written LoRA layer backward of tandem-model's `finetune::fused`):
//! - `xwt`: `x · wᵀ` for a weight stored as [n, k] — `dense`'s batch-invariant product, the one
//!   the inference forward runs, so a training forward computes the same bits;
//! - `gemm`: `c = c·keep + alpha · a · b` for strided views (`Mat`, transposes are free), through
//!   the gemm crate, which is what candle's CPU matmul runs.

use crate::dense::product;

/// A read-only strided matrix view of a slice: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major [rows, cols] matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// Rows of `cols` values `rs` apart (a column block of a wider row-major matrix).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The transpose, as a view of the same values.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Whether every element the view names lies in its slice.
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `x · wᵀ` for `x` [m, k] and `w` [n, k], both row-major: `dense`'s batch-invariant product.
pub fn xwt(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert!(
        x.len() >= m * k && w.len() >= n * k,
        "xwt: operands too short"
    );
    product(x, w, m, n, k)
}

/// `c = (keep ? c : 0) + alpha · a · b`, with `c` row-major [a.rows, b.cols] `ldc` values apart
/// per row. Large products run on rayon's threads.
///
/// # Panics
/// If the shapes do not fit or a view names elements outside its slice.
pub fn gemm(c: &mut [f32], ldc: usize, keep: bool, a: Mat, b: Mat, alpha: f32) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "gemm: a is [{m}, {k}], b [{}, {n}]", b.rows);
    assert!(a.fits() && b.fits(), "gemm: a view is outside its slice");
    assert!(
        m == 0 || n == 0 || (m - 1) * ldc + n <= c.len(),
        "gemm: c is too short"
    );
    assert!(ldc >= n, "gemm: ldc {ldc} under {n} columns");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !keep {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(0.0);
            }
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm_lib::Parallelism::Rayon(threads)
    } else {
        gemm_lib::Parallelism::None
    };
    // SAFETY: the asserts above keep every element the three views name inside their slices
    // (`fits`, and c's last row ends within it); c is borrowed mutably, so it aliases neither
    // operand. gemm computes dst = alpha_dst·dst + beta·lhs·rhs, reading dst only when told.
    unsafe {
        gemm_lib::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            keep,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// `a · b` as a new row-major [a.rows, b.cols] buffer.
pub fn matmul(a: Mat, b: Mat) -> Vec<f32> {
    let mut c = vec![0f32; a.rows * b.cols];
    gemm(&mut c, b.cols, false, a, b, 1.0);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: &mut u32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (*seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    fn reference(a: Mat, b: Mat) -> Vec<f64> {
        let mut c = vec![0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                c[i * b.cols + j] = (0..a.cols)
                    .map(|p| {
                        a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64
                    })
                    .sum();
            }
        }
        c
    }

    #[test]
    fn strided_and_transposed_products_equal_a_float64_product() {
        let mut seed = 3u32;
        for &(m, k, n) in &[(1, 1, 1), (5, 7, 3), (33, 64, 17), (130, 96, 200)] {
            let a = rand(m * k, &mut seed);
            let b = rand(k * n, &mut seed);
            let at = rand(k * m, &mut seed);
            let bt = rand(n * k, &mut seed);
            for (av, bv) in [
                (Mat::new(&a, m, k), Mat::new(&b, k, n)),
                (Mat::new(&at, k, m).t(), Mat::new(&b, k, n)),
                (Mat::new(&a, m, k), Mat::new(&bt, n, k).t()),
                (Mat::new(&at, k, m).t(), Mat::new(&bt, n, k).t()),
            ] {
                let want = reference(av, bv);
                let got = matmul(av, bv);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-5 * (k as f64).sqrt(),
                        "{m}x{k}x{n}"
                    );
                }
                // Accumulating with a scale into a wider buffer.
                let mut c = vec![1f32; m * (n + 2)];
                gemm(&mut c, n + 2, true, av, bv, 0.5);
                for i in 0..m {
                    for j in 0..n + 2 {
                        let v = c[i * (n + 2) + j] as f64;
                        let w = if j < n {
                            1.0 + 0.5 * want[i * n + j]
                        } else {
                            1.0
                        };
                        assert!((v - w).abs() < 1e-5 * (k as f64).sqrt());
                    }
                }
            }
        }
    }

    #[test]
    fn xwt_is_dense() {
        let mut seed = 9u32;
        let (m, n, k) = (7, 5, 40);
        let x = rand(m * k, &mut seed);
        let w = rand(n * k, &mut seed);
        let y = xwt(&x, &w, m, n, k);
        for i in 0..m {
            for j in 0..n {
                let want = crate::dense::dot_canonical(&x[i * k..][..k], &w[j * k..][..k]);
                assert_eq!(y[i * n + j].to_bits(), want.to_bits());
            }
        }
    }

    #[test]
    #[should_panic(expected = "outside its slice")]
    fn a_view_past_its_slice_is_refused() {
        let a = vec![0f32; 6];
        let b = vec![0f32; 6];
        let _ = matmul(Mat::new(&a, 3, 3), Mat::new(&b, 3, 2));
    }
}
