//! The AVX-512 tiles of `dense` (batch-invariant `x · wᵀ`): 4 rows × 4 weight rows per tile (1 × 8
//! for a single row),
//! sixteen lanes per accumulator, the canonical order of `dense`'s header.

use std::arch::x86_64::*;

/// `out` [rows, cols] = x [rows, k] · w [cols, k]ᵀ. A single row (decode) takes tiles of 8
/// weight rows, for more reads in flight; more rows take 4 × 4.
///
/// # Safety
/// The CPU must have AVX-512F; `x` holds `rows * k` values, `w` `cols * k`, `out` `rows * cols`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn block_avx512(
    x: &[f32],
    w: &[f32],
    k: usize,
    rows: usize,
    cols: usize,
    out: &mut [f32],
) {
    assert!(x.len() >= rows * k && w.len() >= cols * k && out.len() >= rows * cols);
    if rows == 1 {
        block::<8>(x, w, k, rows, cols, out)
    } else {
        block::<4>(x, w, k, rows, cols, out)
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn block<const C: usize>(
    x: &[f32],
    w: &[f32],
    k: usize,
    rows: usize,
    cols: usize,
    out: &mut [f32],
) {
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    for c0 in (0..cols).step_by(C) {
        let nc = C.min(cols - c0);
        // A tile past the last column repeats it (computed, never stored).
        let mut wr = [wp; C];
        for (c, p) in wr.iter_mut().enumerate() {
            *p = wp.add((c0 + c.min(nc - 1)) * k);
        }
        // The next tile's weight rows follow this one's in memory: the first pass over this
        // tile asks for them, so that they are not waited on (each tile is a few short rows,
        // too short for the hardware prefetchers to get ahead).
        let next = wp.wrapping_add((c0 + C) * k);
        let mut r0 = 0;
        while r0 < rows {
            let nr = 4.min(rows - r0);
            let xr = |r: usize| xp.add((r0 + r) * k);
            let o = &mut out[r0 * cols + c0..];
            let pf = (r0 == 0).then_some(next);
            match nr {
                4 => store(
                    &tile::<4, C>([xr(0), xr(1), xr(2), xr(3)], wr, k, pf),
                    nc,
                    cols,
                    o,
                ),
                3 => store(&tile::<3, C>([xr(0), xr(1), xr(2)], wr, k, pf), nc, cols, o),
                2 => store(&tile::<2, C>([xr(0), xr(1)], wr, k, pf), nc, cols, o),
                _ => store(&tile::<1, C>([xr(0)], wr, k, pf), nc, cols, o),
            }
            r0 += nr;
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store<const R: usize, const C: usize>(
    acc: &[[__m512; C]; R],
    nc: usize,
    cols: usize,
    out: &mut [f32],
) {
    for (r, row) in acc.iter().enumerate() {
        for (c, a) in row.iter().enumerate().take(nc) {
            out[r * cols + c] = hsum(*a);
        }
    }
}

/// R rows × C weight rows, each accumulator's lane j summing the terms i ≡ j (mod 16); with
/// `prefetch`, the C rows of `k` values from there are asked for along the way.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const C: usize>(
    xr: [*const f32; R],
    wr: [*const f32; C],
    k: usize,
    prefetch: Option<*const f32>,
) -> [[__m512; C]; R] {
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let full = k / 16 * 16;
    let mut i = 0;
    while i < full {
        if let Some(p) = prefetch {
            for c in 0..C {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(c * k + i) as *const i8);
            }
        }
        let mut xv = [_mm512_setzero_ps(); R];
        for r in 0..R {
            xv[r] = _mm512_loadu_ps(xr[r].add(i));
        }
        for c in 0..C {
            let wv = _mm512_loadu_ps(wr[c].add(i));
            for r in 0..R {
                acc[r][c] = _mm512_fmadd_ps(xv[r], wv, acc[r][c]);
            }
        }
        i += 16;
    }
    if full < k {
        // The partial group feeds only its first lanes; the others keep their sums as they are.
        let m: __mmask16 = ((1u32 << (k - full)) - 1) as __mmask16;
        let mut xv = [_mm512_setzero_ps(); R];
        for r in 0..R {
            xv[r] = _mm512_maskz_loadu_ps(m, xr[r].add(full));
        }
        for c in 0..C {
            let wv = _mm512_maskz_loadu_ps(m, wr[c].add(full));
            for r in 0..R {
                acc[r][c] = _mm512_mask3_fmadd_ps(xv[r], wv, acc[r][c], m);
            }
        }
    }
    acc
}

/// The lanes summed as the canonical tree: (a[j] + a[j+8]), then + 4, + 2, + 1 lanes away.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn hsum(v: __m512) -> f32 {
    let t = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v));
    let t = _mm512_add_ps(t, _mm512_shuffle_f32x4::<0b10_11_00_01>(t, t));
    let t = _mm512_add_ps(t, _mm512_permute_ps::<0b01_00_11_10>(t));
    let t = _mm512_add_ps(t, _mm512_permute_ps::<0b10_11_00_01>(t));
    _mm512_cvtss_f32(t)
}
