//! Small CPU helpers the ops' CPU paths share.

/// `a · b` with eight independent accumulators, so that the compiler can keep them in SIMD lanes
/// (a single running sum must keep the sequential order of float additions). Inlined into its
/// callers, so a caller compiled for AVX2 gets an AVX2 loop.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}
