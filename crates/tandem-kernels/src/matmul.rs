//! Plain f32 products on host slices, for CPU code that works on its own buffers rather than
//! candle tensors (the hand-written LoRA layer backward of tandem-model's `finetune::fused`):
//! - `xwt`: `x · wᵀ` for a weight stored as [n, k] (a layer's forward);
//! - `gemm` / `gemm_sum`: `c = c·keep + Σ alpha · a · b` for strided views (`Mat`, transposes
//!   are free). On a CPU with AVX-512 through `matmul_x86` (B packed per block, A broadcast),
//!   elsewhere through the gemm crate, which is what candle's CPU matmul runs.

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
    pub(crate) fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `x · wᵀ` for `x` [m, k] and `w` [n, k], both row-major, as a new [m, n] buffer (`gemm`:
/// not batch-invariant; `dense` is, where a row's bits must not depend on its batch).
pub fn xwt(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    matmul(Mat::new(x, m, k), Mat::new(w, n, k).t())
}

/// `c = (keep ? c : 0) + alpha · a · b`, with `c` row-major [a.rows, b.cols] `ldc` values apart
/// per row. Large products run on rayon's threads.
///
/// # Panics
/// If the shapes do not fit or a view names elements outside its slice.
pub fn gemm(c: &mut [f32], ldc: usize, keep: bool, a: Mat, b: Mat, alpha: f32) {
    gemm_sum(c, ldc, keep, &[(a, b, alpha)]);
}

/// `c = (keep ? c : 0) + Σ alpha · a · b` over `terms` (each a [m, k], b [k, n], the same m and
/// n, any k): one pass over C for a sum such as `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`.
///
/// # Panics
/// If the shapes do not fit or a view names elements outside its slice.
pub fn gemm_sum(c: &mut [f32], ldc: usize, keep: bool, terms: &[(Mat, Mat, f32)]) {
    let Some((a0, b0, _)) = terms.first() else {
        return;
    };
    let (m, n) = (a0.rows, b0.cols);
    for (a, b, _) in terms {
        assert!(
            a.rows == m && b.cols == n && a.cols == b.rows,
            "gemm: a is [{}, {}], b [{}, {}] in a sum of [{m}, {n}] products",
            a.rows,
            a.cols,
            b.rows,
            b.cols
        );
        assert!(a.fits() && b.fits(), "gemm: a view is outside its slice");
    }
    assert!(
        m == 0 || n == 0 || (m - 1) * ldc + n <= c.len(),
        "gemm: c is too short"
    );
    assert!(ldc >= n, "gemm: ldc {ldc} under {n} columns");
    if m == 0 || n == 0 {
        return;
    }
    // A product with both operands contiguous along k and one side thin — x·Wᵀ for a W of a
    // few rows (a LoRA factor), or a few rows of x against a wide W (the LM head over a
    // batch's target rows): dot products along k read each operand once, where packing the
    // wide one's transpose for so few rows would cost more than the products (the head's
    // 33 × 49152 logits: 79 → 117 GFLOP/s on 2 threads).
    #[cfg(target_arch = "x86_64")]
    if let [(a, b, alpha)] = terms {
        let k = a.cols;
        if (n <= 16 || (m <= 48 && n >= 1024))
            && a.cs == 1
            && b.rs == 1
            && k > 0
            && std::arch::is_x86_feature_detected!("avx512f")
        {
            // SAFETY: AVX-512F is present; the asserts above bound every element the views
            // name (A's rows a.rs apart, W's rows — B's columns — b.cs apart).
            unsafe {
                crate::matmul_x86::narrow(
                    (m, n, k),
                    a.data,
                    a.rs,
                    b.data,
                    b.cs,
                    c,
                    ldc,
                    keep,
                    *alpha,
                )
            };
            return;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present; the asserts above bound every element the views name
        // and C's last row.
        unsafe { crate::matmul_x86::gemm_sum(m, n, c, ldc, keep, terms) };
        return;
    }
    portable_sum(c, ldc, keep, terms);
}

/// `gemm_sum` through the gemm crate, term after term (CPUs without AVX-512; checked shapes).
fn portable_sum(c: &mut [f32], ldc: usize, keep: bool, terms: &[(Mat, Mat, f32)]) {
    let (m, n) = (terms[0].0.rows, terms[0].1.cols);
    if !keep {
        for r in 0..m {
            c[r * ldc..r * ldc + n].fill(0.0);
        }
    }
    for &(a, b, alpha) in terms {
        gemm_crate(c, ldc, true, a, b, alpha);
    }
}

/// One product through the gemm crate (checked by `gemm_sum`).
fn gemm_crate(c: &mut [f32], ldc: usize, keep: bool, a: Mat, b: Mat, alpha: f32) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if k == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm_lib::Parallelism::Rayon(threads)
    } else {
        gemm_lib::Parallelism::None
    };
    // SAFETY: `gemm_sum` checked that every element the three views name lies inside their
    // slices (`fits`, and c's last row ends within it); c is borrowed mutably, so it aliases
    // neither operand. gemm computes dst = alpha_dst·dst + beta·lhs·rhs, reading dst only when
    // told.
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
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 7, 3),
            (33, 64, 17),
            (130, 96, 200),
            (70, 600, 45),
            (17, 300, 13),
            // Last row tiles of 2 and 7 rows (the 4- and 8-row tiles).
            (26, 200, 40),
            (31, 70, 33),
            // Over 8M multiply-adds: columns split among threads, several k blocks, the next
            // panel prefetched while one runs.
            (100, 700, 130),
            // A few rows against a wide W (dot products, W's rows split among threads).
            (40, 200, 1100),
            (5, 40, 1030),
        ] {
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
                let mut portable = vec![f32::NAN; m * n];
                portable_sum(&mut portable, n, false, &[(av, bv, 1.0)]);
                let tol = 1e-5 * (k as f64).sqrt();
                for ((g, p), w) in got.iter().zip(&portable).zip(&want) {
                    assert!((*g as f64 - w).abs() < tol, "{m}x{k}x{n}");
                    assert!((*p as f64 - w).abs() < tol, "portable {m}x{k}x{n}");
                }
                // A sum of two products in one pass: a·b + 0.25·a·b.
                let mut c = vec![f32::NAN; m * n];
                gemm_sum(&mut c, n, false, &[(av, bv, 1.0), (av, bv, 0.25)]);
                for (g, w) in c.iter().zip(&want) {
                    assert!((*g as f64 - 1.25 * w).abs() < 2.0 * tol, "sum {m}x{k}x{n}");
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

    /// `x·Wᵀ + s·u·Bᵀ` (a LoRA projection): the short second term joins the first one's last
    /// block; either orientation of B, several row tiles, a partial last panel.
    #[test]
    fn a_sum_with_a_short_term_equals_its_parts() {
        let mut seed = 5u32;
        for &(m, k, n, r) in &[(130, 96, 200, 8), (40, 300, 45, 16), (13, 20, 17, 1)] {
            let x = rand(m * k, &mut seed);
            let w = rand(n * k, &mut seed);
            let u = rand(m * r, &mut seed);
            let b = rand(n * r, &mut seed);
            let bt: Vec<f32> = (0..r * n).map(|i| b[(i % n) * r + i / n]).collect();
            let main = (Mat::new(&x, m, k), Mat::new(&w, n, k).t(), 1.0);
            let want_main = reference(main.0, main.1);
            for short in [
                (Mat::new(&u, m, r), Mat::new(&b, n, r).t(), 0.5),
                (Mat::new(&u, m, r), Mat::new(&bt, r, n), 0.5),
            ] {
                let want_short = reference(short.0, short.1);
                for keep in [false, true] {
                    let mut c = vec![2f32; m * n];
                    gemm_sum(&mut c, n, keep, &[main, short]);
                    for (i, g) in c.iter().enumerate() {
                        let w = want_main[i] + 0.5 * want_short[i] + if keep { 2.0 } else { 0.0 };
                        assert!(
                            (*g as f64 - w).abs() < 1e-4,
                            "{m}x{k}x{n} r {r}: {g} vs {w}"
                        );
                    }
                }
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
