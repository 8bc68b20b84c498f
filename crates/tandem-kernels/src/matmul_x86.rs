//! The AVX-512 product behind `matmul::gemm` / `gemm_sum`: C = keep·C + Σ_t alpha_t·A_t·B_t,
//! the way BLIS-style kernels do it, shaped for training's products on the CPU (a few hundred
//! rows of activations against a weight, in either orientation; LoRA's narrow factors;
//! attention's per-head products; the LM head's long reduction).
//!
//! - Columns of C are split among rayon tasks; each task walks k in blocks of `KC`, and each
//!   block in panels of `16·NV` columns. It packs a panel of B — contiguous per k step, scaled
//!   by the term's alpha; B may be any strided view, a weight as stored or its transpose —
//!   into one buffer that stays in L1, runs register tiles over every `MR` rows of A against
//!   it, adding into C, and meanwhile prefetches the next panel's part of B into L2 (a
//!   layer's weights are not in cache when its product starts; waiting for them was a fifth
//!   of training's time).
//! - A register tile: MR rows of A, each element broadcast (A may have any strides), against a
//!   panel's vectors: MR × NV accumulators of 16 lanes, NV vector loads and MR broadcasts per k
//!   step. On data in L1 it runs at the core's FMA peak (measured: 184 GFLOP/s on one core of
//!   a 2.6 GHz Xeon).

use crate::matmul::Mat;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Rows of A per register tile.
const MR: usize = 12;
/// k per packed block: a panel of 32 columns is 24 KiB, reused from L1 by every row tile.
const KC: usize = 192;
/// Multiply-adds below which a product runs on the calling thread.
const SERIAL: usize = 1 << 23;

/// C's base pointer, shared by tasks that write disjoint columns of it.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes only its own columns of C, and C outlives the parallel section.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Lanes of a vector that hold columns `c..c + 16` below `n`.
fn lanes(c: usize, n: usize) -> __mmask16 {
    let valid = n.saturating_sub(c).min(16);
    ((1u32 << valid) - 1) as __mmask16
}

/// C[m, n] (row stride `ldc`) = keep·C + Σ alpha·a·b over `terms` (each a [m, k_t], b [k_t, n]).
///
/// # Safety
/// The CPU must have AVX-512F; every view must lie in its slice (`Mat::fits`) and `c` must hold
/// `(m - 1)·ldc + n` values.
pub(crate) unsafe fn gemm_sum(
    m: usize,
    n: usize,
    c: &mut [f32],
    ldc: usize,
    keep: bool,
    terms: &[(Mat, Mat, f32)],
) {
    if m == 0 || n == 0 {
        return;
    }
    let nv1 = n <= 16;
    let nr = if nv1 { 16 } else { 32 };
    let panels = n.div_ceil(nr);
    let work: usize = terms.iter().map(|(a, _, _)| a.cols).sum::<usize>() * m * n;
    let threads = rayon::current_num_threads().max(1);
    let tasks = if work < SERIAL {
        1
    } else {
        panels.min(threads)
    };
    let per = panels.div_ceil(tasks);
    let out = Out(c.as_mut_ptr());
    let run = |t: usize| {
        let cols = (t * per * nr).min(n)..((t + 1) * per * nr).min(n);
        if cols.is_empty() {
            return;
        }
        // SAFETY: the caller's guarantees; tasks own disjoint column ranges of C.
        unsafe {
            if nv1 {
                task::<1>(m, cols, out, ldc, keep, terms)
            } else {
                task::<2>(m, cols, out, ldc, keep, terms)
            }
        }
    };
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// One task's columns `cols` of C, over every term.
#[target_feature(enable = "avx512f")]
unsafe fn task<const NV: usize>(
    m: usize,
    cols: std::ops::Range<usize>,
    c: Out,
    ldc: usize,
    keep: bool,
    terms: &[(Mat, Mat, f32)],
) {
    let nr = 16 * NV;
    let panels = cols.len().div_ceil(nr);
    // The packing buffer is the thread's own, kept between calls (a fresh one of this size
    // would be mapped and zeroed by the allocator on every call); each k block writes every
    // element it then reads.
    PACKED.with(|cell| {
        let mut packed = cell.take();
        let tail: usize = terms[terms.len() - tail_terms(m, terms)..]
            .iter()
            .map(|(a, _, _)| a.cols)
            .sum();
        packed.resize(packed.len().max(KC * nr + tail * panels * nr), 0.0);
        task_with::<NV>(m, &cols, c, ldc, keep, terms, &mut packed);
        cell.set(packed);
    });
}

thread_local! {
    static PACKED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Rows of A up to which a B with contiguous rows is read where it lies rather than packed.
const DIRECT_ROWS: usize = MR;

/// Whether `task_with` reads `b` in place: its rows contiguous and few row tiles to reuse a
/// packed panel (LoRA's r × in factors: duᵀ·x, uᵀ·dy), so a packing pass would cost more than
/// the strided reads it saves.
fn direct_b(m: usize, b: &Mat) -> bool {
    b.cs == 1 && m <= DIRECT_ROWS
}

/// Terms of at most this k that follow a longer one (LoRA's `u·Bᵀ`, `du·A`: k = r) join its
/// last k block's tiles instead of passing over C again.
const TAIL_K: usize = 32;

/// How many of `terms`, from the end, `task_with` folds into the last block of the one before.
fn tail_terms(m: usize, terms: &[(Mat, Mat, f32)]) -> usize {
    if m <= MR {
        return 0;
    }
    let tail = terms
        .iter()
        .rev()
        .take_while(|(a, b, _)| a.cols <= TAIL_K && !direct_b(m, b))
        .count();
    if tail == terms.len()
        || terms[..terms.len() - tail]
            .last()
            .is_some_and(|t| t.0.cols == 0)
    {
        0
    } else {
        tail
    }
}

/// `task` with its packing buffer: one k block of the main terms at a time, then the tail
/// terms (packed whole, up front) inside the last block's tiles.
#[target_feature(enable = "avx512f")]
unsafe fn task_with<const NV: usize>(
    m: usize,
    cols: &std::ops::Range<usize>,
    c: Out,
    ldc: usize,
    keep: bool,
    terms: &[(Mat, Mat, f32)],
    packed: &mut [f32],
) {
    let nr = 16 * NV;
    let panels = cols.len().div_ceil(nr);
    let tails = tail_terms(m, terms);
    let (main, tail) = terms.split_at(terms.len() - tails);
    let (packed, tail_buf) = packed.split_at_mut(KC * nr);
    let mut tail_at = Vec::with_capacity(tail.len());
    let mut at = 0;
    for (_, b, alpha) in tail {
        let k = b.rows;
        pack::<NV>(b, 0, k, cols, *alpha, &mut tail_buf[at..]);
        tail_at.push(at);
        at += k * panels * nr;
    }
    let mut first = !keep;
    // Every (term, k block, panel) this task packs, in order: while one panel's row tiles run,
    // the next one's part of B is prefetched, so packing reads B from L2 rather than waiting
    // on memory (a layer's weights are not in cache when its product starts).
    let steps: Vec<(usize, usize, usize, usize)> = main
        .iter()
        .enumerate()
        .filter(|(_, (a, b, _))| !direct_b(m, b) && a.cols > 0)
        .flat_map(|(ti, (a, _, _))| {
            (0..a.cols).step_by(KC).flat_map(move |k0| {
                let kc = KC.min(a.cols - k0);
                (0..panels).map(move |panel| (ti, k0, kc, panel))
            })
        })
        .collect();
    let mut step = 0;
    let tiles = m.div_ceil(MR);
    for (ti, (a, b, alpha)) in main.iter().enumerate() {
        let k = a.cols;
        let mut k0 = 0;
        let direct = direct_b(m, b);
        let scale = _mm512_set1_ps(if direct { *alpha } else { 1.0 });
        while k0 < k {
            let kc = KC.min(k - k0);
            let last = ti + 1 == main.len() && k0 + kc == k;
            for panel in 0..panels {
                let j0 = cols.start + panel * nr;
                let mask: [__mmask16; NV] = std::array::from_fn(|v| lanes(j0 + 16 * v, cols.end));
                let next = if direct {
                    None
                } else {
                    let pcols = j0..(j0 + nr).min(cols.end);
                    pack::<NV>(b, k0, kc, &pcols, *alpha, &mut packed[..kc * nr]);
                    step += 1;
                    steps.get(step).map(|&(nt, nk0, nkc, np)| {
                        let ncols =
                            cols.start + np * nr..(cols.start + (np + 1) * nr).min(cols.end);
                        (main[nt].1, nk0, nkc, ncols)
                    })
                };
                let (vp, ldv) = if direct {
                    (b.data.as_ptr().add(k0 * b.rs + j0), b.rs)
                } else {
                    (packed.as_ptr(), nr)
                };
                for i0 in (0..m).step_by(MR) {
                    let rows = MR.min(m - i0);
                    if let Some((nb, nk0, nkc, ncols)) = &next {
                        prefetch_part(nb, *nk0, *nkc, ncols, i0 / MR, tiles);
                    }
                    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
                    run_tile::<NV>(a, i0, rows, k0, kc, vp, ldv, mask, direct, &mut acc);
                    if direct {
                        for row in acc.iter_mut() {
                            for v in row.iter_mut() {
                                *v = _mm512_mul_ps(*v, scale);
                            }
                        }
                    }
                    if last {
                        for ((ta, tb, _), &off) in tail.iter().zip(&tail_at) {
                            let k = tb.rows;
                            let vp = tail_buf.as_ptr().add(off + panel * k * nr);
                            run_tile::<NV>(ta, i0, rows, 0, k, vp, nr, mask, false, &mut acc);
                        }
                    }
                    for (r, row) in acc.iter().enumerate().take(rows) {
                        for (v, &val) in row.iter().enumerate() {
                            let dst = c.0.add((i0 + r) * ldc + j0 + 16 * v);
                            let sum = if first {
                                val
                            } else {
                                _mm512_add_ps(val, _mm512_maskz_loadu_ps(mask[v], dst))
                            };
                            _mm512_mask_storeu_ps(dst, mask[v], sum);
                        }
                    }
                }
            }
            first = false;
            k0 += kc;
        }
    }
    if first {
        // No term had any k: C = 0 on these columns.
        for i in 0..m {
            std::ptr::write_bytes(c.0.add(i * ldc + cols.start), 0, cols.len());
        }
    }
}

/// One register tile of `a`'s rows `i0..i0 + rows` (rows past them repeat the last, computed
/// and never stored) over k steps `k0..k0 + kc` against the panel at `vp`, into `acc`.
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn run_tile<const NV: usize>(
    a: &Mat,
    i0: usize,
    rows: usize,
    k0: usize,
    kc: usize,
    vp: *const f32,
    ldv: usize,
    mask: [__mmask16; NV],
    direct: bool,
    acc: &mut [[__m512; NV]; MR],
) {
    let bc: [*const f32; MR] = std::array::from_fn(|r| {
        a.data
            .as_ptr()
            .add((i0 + r.min(rows - 1)) * a.rs + k0 * a.cs)
    });
    // A last tile of a few rows runs a shorter tile (182 rows: 15 of 12 and one of 4, not a
    // 16th of 12 that computes 10 rows for nothing).
    if rows <= 4 {
        let (acc4, _) = acc.split_first_chunk_mut::<4>().expect("MR >= 4");
        let bc4: [*const f32; 4] = std::array::from_fn(|r| bc[r]);
        tile_rows::<NV, 4>(a, kc, bc4, vp, ldv, mask, direct, acc4)
    } else if rows <= 8 {
        let (acc8, _) = acc.split_first_chunk_mut::<8>().expect("MR >= 8");
        let bc8: [*const f32; 8] = std::array::from_fn(|r| bc[r]);
        tile_rows::<NV, 8>(a, kc, bc8, vp, ldv, mask, direct, acc8)
    } else {
        tile_rows::<NV, MR>(a, kc, bc, vp, ldv, mask, direct, acc)
    }
}

/// `tile` for `R` rows, dispatched on A's column stride and whether B is packed.
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows<const NV: usize, const R: usize>(
    a: &Mat,
    kc: usize,
    bc: [*const f32; R],
    vp: *const f32,
    ldv: usize,
    mask: [__mmask16; NV],
    direct: bool,
    acc: &mut [[__m512; NV]; R],
) {
    match (a.cs == 1, direct) {
        (true, false) => tile::<NV, R, true, false>(kc, bc, 1, vp, ldv, mask, acc),
        (false, false) => tile::<NV, R, false, false>(kc, bc, a.cs, vp, ldv, mask, acc),
        (true, true) => tile::<NV, R, true, true>(kc, bc, 1, vp, ldv, mask, acc),
        (false, true) => tile::<NV, R, false, true>(kc, bc, a.cs, vp, ldv, mask, acc),
    }
}

/// Prefetches into L2 the `part`-th of `parts` shares of what `pack` will read of `b` (rows
/// `k0..k0 + kc`, columns `cols`): a share of its row segments (B's rows contiguous) or column
/// segments (B = Wᵀ), every cache line of each.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn prefetch_part(
    b: &Mat,
    k0: usize,
    kc: usize,
    cols: &std::ops::Range<usize>,
    part: usize,
    parts: usize,
) {
    let (segments, seg_len) = if b.cs == 1 {
        (kc, cols.len())
    } else if b.rs == 1 {
        (cols.len(), kc)
    } else {
        return;
    };
    let base = b.data.as_ptr();
    for s in segments * part / parts..segments * (part + 1) / parts {
        let start = if b.cs == 1 {
            (k0 + s) * b.rs + cols.start
        } else {
            (cols.start + s) * b.cs + k0
        };
        let first = base.wrapping_add(start) as usize & !63;
        let end = base.wrapping_add(start + seg_len) as usize;
        let mut line = first;
        while line < end {
            _mm_prefetch::<_MM_HINT_T1>(line as *const i8);
            line += 64;
        }
    }
}

/// Packs rows `k0..k0 + kc` of `b`, columns `cols`, times `alpha`, into panels of `16·NV`
/// columns: `out[panel][p][l]` = alpha · b[k0 + p, cols.start + panel·16·NV + l] (zero past the
/// last column).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn pack<const NV: usize>(
    b: &Mat,
    k0: usize,
    kc: usize,
    cols: &std::ops::Range<usize>,
    alpha: f32,
    out: &mut [f32],
) {
    let nr = 16 * NV;
    let panels = cols.len().div_ceil(nr);
    let src = b.data.as_ptr();
    let scale = _mm512_set1_ps(alpha);
    if b.cs == 1 {
        // Rows of B contiguous: each row's part is read in order, a vector at a time.
        for p in 0..kc {
            let row = src.add((k0 + p) * b.rs);
            for panel in 0..panels {
                let j0 = cols.start + panel * nr;
                let dst = out.as_mut_ptr().add(panel * kc * nr + p * nr);
                for v in 0..NV {
                    let m = lanes(j0 + 16 * v, cols.end);
                    let x = _mm512_maskz_loadu_ps(m, row.add(j0 + 16 * v));
                    _mm512_storeu_ps(dst.add(16 * v), _mm512_mul_ps(x, scale));
                }
            }
        }
    } else if b.rs == 1 {
        // Columns of B contiguous (B = Wᵀ, W's rows): 16 columns × 16 k steps at a time, read
        // as 16 vectors along k and transposed in registers.
        for panel in 0..panels {
            let base = out.as_mut_ptr().add(panel * kc * nr);
            for h in 0..NV {
                let j0 = cols.start + panel * nr + 16 * h;
                let valid = cols.end.saturating_sub(j0).min(16);
                for p0 in (0..kc).step_by(16) {
                    let km = lanes(p0, kc);
                    let mut r = [_mm512_setzero_ps(); 16];
                    for (i, ri) in r.iter_mut().enumerate().take(valid) {
                        *ri = _mm512_maskz_loadu_ps(km, src.add((j0 + i) * b.cs + k0 + p0));
                    }
                    transpose16(&mut r);
                    for (q, rq) in r.iter().enumerate().take(kc - p0) {
                        _mm512_storeu_ps(
                            base.add((p0 + q) * nr + 16 * h),
                            _mm512_mul_ps(*rq, scale),
                        );
                    }
                }
            }
        }
    } else {
        // Any other strides: element by element.
        for panel in 0..panels {
            let base = out.as_mut_ptr().add(panel * kc * nr);
            for l in 0..nr {
                let j = cols.start + panel * nr + l;
                for p in 0..kc {
                    *base.add(p * nr + l) = if j < cols.end {
                        alpha * *src.add((k0 + p) * b.rs + j * b.cs)
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// Transposes the 16 × 16 matrix whose rows are `r` in place (row i becomes column i).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_shuffle_ps::<0x44>(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_shuffle_ps::<0x44>(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * i + 1], t[4 * i + 3]);
    }
    for i in 0..2 {
        for j in 0..4 {
            t[8 * i + j] = _mm512_shuffle_f32x4::<0x88>(u[8 * i + j], u[8 * i + j + 4]);
            t[8 * i + j + 4] = _mm512_shuffle_f32x4::<0xDD>(u[8 * i + j], u[8 * i + j + 4]);
        }
    }
    for j in 0..8 {
        r[j] = _mm512_shuffle_f32x4::<0x88>(t[j], t[j + 8]);
        r[j + 8] = _mm512_shuffle_f32x4::<0xDD>(t[j], t[j + 8]);
    }
}

/// acc[r][v] += Σ_p bc[r][p·bs] · vp[p·ldv + 16v .. +16] over p < kc (`UNIT`: bs = 1; `DIRECT`:
/// B read where it lies, lanes outside `mask` as zeros; packed panels are whole).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const NV: usize, const R: usize, const UNIT: bool, const DIRECT: bool>(
    kc: usize,
    bc: [*const f32; R],
    bs: usize,
    vp: *const f32,
    ldv: usize,
    mask: [__mmask16; NV],
    acc: &mut [[__m512; NV]; R],
) {
    let mut a = *acc;
    for p in 0..kc {
        let mut x = [_mm512_setzero_ps(); NV];
        for (v, xv) in x.iter_mut().enumerate() {
            let at = vp.add(p * ldv + 16 * v);
            *xv = if DIRECT {
                _mm512_maskz_loadu_ps(mask[v], at)
            } else {
                _mm512_loadu_ps(at)
            };
        }
        let off = if UNIT { p } else { p * bs };
        for (row, ar) in bc.iter().zip(a.iter_mut()) {
            let s = _mm512_set1_ps(*row.add(off));
            for (av, xv) in ar.iter_mut().zip(&x) {
                *av = _mm512_fmadd_ps(s, *xv, *av);
            }
        }
    }
    *acc = a;
}

/// Rows of A per `narrow` tile, and columns of C (rows of W) per group.
const NARROW_ROWS: usize = 3;
const NARROW_COLS: usize = 8;

/// C[m, n] (row stride `ldc`) = keep·C + alpha · A[m, k] · W[n, k]ᵀ for a narrow C (n a LoRA
/// rank), A's and W's rows contiguous (strides `lda`, `ldw`): dot products along k, 3 rows of A
/// × 8 rows of W at a time (24 accumulators of 16 lanes, each A and W vector loaded once per
/// tile), summed across lanes at the end. Rows of A are split among rayon tasks.
///
/// # Safety
/// The CPU must have AVX-512F; the slices must hold the elements the shapes and strides name.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn narrow(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    lda: usize,
    w: &[f32],
    ldw: usize,
    c: &mut [f32],
    ldc: usize,
    keep: bool,
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    // Tasks split whichever side has more tile groups: A's rows (a LoRA factor's product over
    // many rows) or W's (the LM head over a few target rows).
    let by_w = n.div_ceil(NARROW_COLS) > m.div_ceil(NARROW_ROWS);
    let (len, group) = if by_w {
        (n, NARROW_COLS)
    } else {
        (m, NARROW_ROWS)
    };
    let tasks = if m * n * k < SERIAL {
        1
    } else {
        threads.min(len.div_ceil(group))
    };
    let per = len.div_ceil(group).div_ceil(tasks) * group;
    let out = c.as_mut_ptr() as usize;
    let (ap, wp) = (a.as_ptr() as usize, w.as_ptr() as usize);
    let run = |t: usize| {
        let part = (t * per).min(len)..((t + 1) * per).min(len);
        let (rows, cols) = if by_w { (0..m, part) } else { (part, 0..n) };
        // SAFETY: the caller's guarantees; tasks own disjoint rows or columns of C (W's rows
        // `cols` are C's columns, offset into W and C alike).
        unsafe {
            narrow_rows(
                rows,
                (cols.len(), k),
                ap as *const f32,
                lda,
                (wp as *const f32).add(cols.start * ldw),
                ldw,
                Out((out as *mut f32).add(cols.start)),
                ldc,
                keep,
                alpha,
            )
        };
    };
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// `narrow` for rows `rows` of A and C.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn narrow_rows(
    rows: std::ops::Range<usize>,
    (n, k): (usize, usize),
    a: *const f32,
    lda: usize,
    w: *const f32,
    ldw: usize,
    c: Out,
    ldc: usize,
    keep: bool,
    alpha: f32,
) {
    let full = k / 16 * 16;
    let tail = lanes(full, k);
    for j0 in (0..n).step_by(NARROW_COLS) {
        let cols = NARROW_COLS.min(n - j0);
        let wr: [*const f32; NARROW_COLS] =
            std::array::from_fn(|j| w.add((j0 + j.min(cols - 1)) * ldw));
        let mut i0 = rows.start;
        while i0 < rows.end {
            let nr = NARROW_ROWS.min(rows.end - i0);
            let ar: [*const f32; NARROW_ROWS] =
                std::array::from_fn(|r| a.add((i0 + r.min(nr - 1)) * lda));
            let mut acc = [[_mm512_setzero_ps(); NARROW_COLS]; NARROW_ROWS];
            let mut p = 0;
            while p < k {
                let m = if p < full { 0xffff } else { tail };
                let x: [__m512; NARROW_ROWS] =
                    std::array::from_fn(|r| _mm512_maskz_loadu_ps(m, ar[r].add(p)));
                for (j, wj) in wr.iter().enumerate() {
                    let v = _mm512_maskz_loadu_ps(m, wj.add(p));
                    for (accr, xr) in acc.iter_mut().zip(&x) {
                        accr[j] = _mm512_fmadd_ps(*xr, v, accr[j]);
                    }
                }
                p += 16;
            }
            for (r, accr) in acc.iter().enumerate().take(nr) {
                let dst = c.0.add((i0 + r) * ldc + j0);
                for (j, v) in accr.iter().enumerate().take(cols) {
                    let sum = alpha * _mm512_reduce_add_ps(*v);
                    let d = dst.add(j);
                    *d = if keep { *d + sum } else { sum };
                }
            }
            i0 += nr;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose16_transposes() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let m: Vec<f32> = (0..256).map(|v| v as f32).collect();
        // SAFETY: AVX-512F checked above; every load and store is within `m` / `out`.
        unsafe {
            let mut r: [__m512; 16] =
                std::array::from_fn(|i| _mm512_loadu_ps(m[16 * i..].as_ptr()));
            transpose16(&mut r);
            let mut out = vec![0f32; 256];
            for (i, ri) in r.iter().enumerate() {
                _mm512_storeu_ps(out[16 * i..].as_mut_ptr(), *ri);
            }
            for i in 0..16 {
                for j in 0..16 {
                    assert_eq!(out[16 * i + j], m[16 * j + i], "({i}, {j})");
                }
            }
        }
    }
}
