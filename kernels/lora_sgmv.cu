// Batched multi-LoRA (SGMV semantics) for tandem-kernels' `lora_sgmv` op.
//
// For every token t that belongs to a segment s with an adapter:
//   v[t, r] = scale[s] * sum_i x[t, i] * A[row_offset[s] + r, i]          (shrink, r < rank[s])
//   y[t, o] = sum_r v[t, r] * Bt[row_offset[s] + r, o]                     (expand)
// A ([rows, in]) and Bt ([rows, out], lora_B transposed) are per-projection pools holding each
// resident adapter's rank rows. Ranks differ per segment; each segment computes with its own rank
// (no padding to a common rank), all segments in one launch. Accumulation is in f32.
//
// Work is cut into tiles of up to TILE_T tokens of one segment (a host-built list, two int4 per
// tile): (first token, tokens, first pool row, rank), (scale as f32 bits, 0, 0, 0).
// shrink: grid (n_tiles, k_splits = ceil(in / K_BLOCK)), block 256 (8 warps). The block stages its
//   tile's x[:, K_BLOCK] in shared memory as f32; each warp takes K_BLOCK/8 inputs, each lane one
//   rank row of A (8, 16 or 32 rows per pass; for small ranks the spare lanes split the inputs),
//   the first pass's loads issued before x is staged. The warps' partial sums are reduced in
//   shared memory and stored as this split's partial v[split, t, r] (no atomics, no zeroing).
// expand: grid (n_tiles, ceil(out / 256)), block 256. Each thread owns one output column for the
//   tile's tokens; its first 16 rows of Bt are loaded while the block sums the splits of the
//   tile's v into shared memory.
// Rows of y outside every tile are not written (the host zeroes y when tiles leave gaps).

#include <cuda_bf16.h>
#include "dtype.cuh"
#include <stdint.h>

#define TILE_T 8
#define K_BLOCK 512
#define K_WARP (K_BLOCK / 8)
#define MAX_RANK 256
#define THREADS 256


// Eight consecutive elements as f32: one or two 16-byte loads when `vec` (16-byte aligned and
// whole), else element by element with elements at or past `n` read as zero.
__device__ __forceinline__ void load8(const float *p, float w[8], bool vec, int n) {
    if (vec) {
        const float4 a = reinterpret_cast<const float4 *>(p)[0], b = reinterpret_cast<const float4 *>(p)[1];
        w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) w[i] = i < n ? p[i] : 0.f;
    }
}
__device__ __forceinline__ void load8(const __nv_bfloat16 *p, float w[8], bool vec, int n) {
    if (vec) {
        const uint4 u = *reinterpret_cast<const uint4 *>(p);
        const uint32_t q[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            w[2 * i] = __uint_as_float(q[i] << 16);
            w[2 * i + 1] = __uint_as_float(q[i] & 0xffff0000u);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) w[i] = i < n ? __bfloat162float(p[i]) : 0.f;
    }
}

// Eight elements kept as loaded (bf16: one uint4), converted to f32 where they are used.
template <typename T> struct Raw8;
template <> struct Raw8<float> {
    float4 a, b;
    __device__ __forceinline__ void load(const float *p, bool vec, int n) {
        if (vec) {
            a = reinterpret_cast<const float4 *>(p)[0];
            b = reinterpret_cast<const float4 *>(p)[1];
        } else {
            float w[8];
            load8(p, w, false, n);
            a = make_float4(w[0], w[1], w[2], w[3]);
            b = make_float4(w[4], w[5], w[6], w[7]);
        }
    }
    __device__ __forceinline__ void zero() { a = b = make_float4(0.f, 0.f, 0.f, 0.f); }
    __device__ __forceinline__ void get(float w[8]) const {
        w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
    }
};
template <> struct Raw8<__nv_bfloat16> {
    uint4 u;
    __device__ __forceinline__ void load(const __nv_bfloat16 *p, bool vec, int n) {
        if (vec) {
            u = *reinterpret_cast<const uint4 *>(p);
        } else {
            uint16_t h[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) h[i] = i < n ? reinterpret_cast<const uint16_t *>(p)[i] : 0;
            u = make_uint4(h[0] | (uint32_t)h[1] << 16, h[2] | (uint32_t)h[3] << 16, h[4] | (uint32_t)h[5] << 16,
                           h[6] | (uint32_t)h[7] << 16);
        }
    }
    __device__ __forceinline__ void zero() { u = make_uint4(0, 0, 0, 0); }
    __device__ __forceinline__ void get(float w[8]) const {
        const uint32_t q[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            w[2 * i] = __uint_as_float(q[i] << 16);
            w[2 * i + 1] = __uint_as_float(q[i] & 0xffff0000u);
        }
    }
};

struct Tile {
    int t0, nt, row0, rank;
    float scale;
};

// Tile i of the host-built list: (first token, tokens, first pool row, rank), (scale bits, 0, 0, 0).
__device__ __forceinline__ Tile read_tile(const int32_t *meta, int i) {
    const int4 a = reinterpret_cast<const int4 *>(meta)[2 * i];
    const int4 b = reinterpret_cast<const int4 *>(meta)[2 * i + 1];
    return Tile{a.x, a.y, a.z, a.w, __int_as_float(b.x)};
}

template <typename T>
__device__ void shrink(const T *__restrict__ x, const T *__restrict__ a, float *__restrict__ v,
                       const int32_t *__restrict__ meta, int n_in, int n_tokens, int v_stride) {
    __shared__ __align__(16) float xs[TILE_T][K_BLOCK + 4];
    __shared__ float red[8][TILE_T][32];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const Tile tile = read_tile(meta, blockIdx.x);
    const int k0 = blockIdx.y * K_BLOCK;
    const int kn = min(K_BLOCK, n_in - k0);
    const bool vec = n_in % 8 == 0 && (reinterpret_cast<uintptr_t>(a) & 15) == 0 &&
                     (reinterpret_cast<uintptr_t>(x) & 15) == 0;
    // Lanes: `rows` rank rows per pass (8, 16 or 32); for small ranks the other lanes split the
    // warp's inputs, lane group lq taking groups of eight lq, lq + ksub, ...
    const int rows = tile.rank <= 8 ? 8 : tile.rank <= 16 ? 16 : 32;
    const int ksub = 32 / rows;
    const int lr = lane % rows, lq = lane / rows;
    const int kw0 = warp * K_WARP;
    const int kw_end = min(kw0 + K_WARP, kn);
    constexpr int NI = K_WARP / 8;
    const int ni = NI / ksub;
    Raw8<T> raw[NI];
    auto load_pass = [&](int r0) {
        const int r = r0 + lr;
        const T *arow = a + (size_t)(tile.row0 + r) * n_in + k0;
#pragma unroll
        for (int ii = 0; ii < NI; ++ii) {
            const int k = kw0 + 8 * (ii * ksub + lq);
            if (r < tile.rank && ii < ni && k < kw_end) {
                raw[ii].load(arow + k, vec, kw_end - k);
            } else {
                raw[ii].zero();
            }
        }
    };
    // The first pass's A loads go out before x is staged, so that both are in flight at once.
    load_pass(0);
#pragma unroll
    for (int i = 0; i < TILE_T * K_BLOCK / 8 / THREADS; ++i) {
        const int e = (i * THREADS + tid) * 8;
        const int tok = e / K_BLOCK, k = e % K_BLOCK;
        float w[8];
        if (tok < tile.nt && k < kn) {
            load8(x + (size_t)(tile.t0 + tok) * n_in + k0 + k, w, vec, kn - k);
        } else {
#pragma unroll
            for (int q = 0; q < 8; ++q) w[q] = 0.f;
        }
        *reinterpret_cast<float4 *>(&xs[tok][k]) = make_float4(w[0], w[1], w[2], w[3]);
        *reinterpret_cast<float4 *>(&xs[tok][k + 4]) = make_float4(w[4], w[5], w[6], w[7]);
    }
    __syncthreads();
    for (int r0 = 0; r0 < tile.rank; r0 += rows) {
        if (r0 > 0) load_pass(r0);
        float acc[TILE_T];
#pragma unroll
        for (int j = 0; j < TILE_T; ++j) acc[j] = 0.f;
#pragma unroll
        for (int ii = 0; ii < NI; ++ii) {
            const int k = kw0 + 8 * (ii * ksub + lq);
            if (ii >= ni || k >= kw_end) continue;
            float w[8];
            raw[ii].get(w);
#pragma unroll
            for (int j = 0; j < TILE_T; ++j) {
                const float4 u0 = *reinterpret_cast<const float4 *>(&xs[j][k]);
                const float4 u1 = *reinterpret_cast<const float4 *>(&xs[j][k + 4]);
                acc[j] += u0.x * w[0] + u0.y * w[1] + u0.z * w[2] + u0.w * w[3] + u1.x * w[4] + u1.y * w[5] +
                          u1.z * w[6] + u1.w * w[7];
            }
        }
#pragma unroll
        for (int j = 0; j < TILE_T; ++j) red[warp][j][lane] = acc[j];
        __syncthreads();
        {
            const int j = tid >> 5, l = tid & 31;  // TILE_T * 32 == THREADS
            if (l < rows && j < tile.nt && r0 + l < tile.rank) {
                float sum = 0.f;
#pragma unroll
                for (int w = 0; w < 8; ++w)
                    for (int q = 0; q < ksub; ++q) sum += red[w][j][l + q * rows];
                // This split's partial sum; the expand kernel adds the splits.
                v[((size_t)blockIdx.y * n_tokens + tile.t0 + j) * v_stride + r0 + l] = sum * tile.scale;
            }
        }
        __syncthreads();
    }
}

template <typename T>
__device__ void expand(const float *__restrict__ v, const T *__restrict__ bt, T *__restrict__ y,
                       const int32_t *__restrict__ meta, int n_out, int n_tokens, int v_stride, int k_splits) {
    __shared__ __align__(16) float vs[TILE_T][MAX_RANK];
    const int tid = threadIdx.x;
    const Tile tile = read_tile(meta, blockIdx.x);
    const int o = blockIdx.y * THREADS + tid;
    const bool valid = o < n_out;
    const T *b = bt + (size_t)tile.row0 * n_out + o;
    // The first B values go out before v is gathered.
    constexpr int RP = 16;
    float wp[RP];
#pragma unroll
    for (int r = 0; r < RP; ++r) wp[r] = valid && r < tile.rank ? to_f32(b[(size_t)r * n_out]) : 0.f;
    for (int i = tid; i < TILE_T * tile.rank; i += THREADS) {
        const int tok = i / tile.rank, r = i % tile.rank;
        float sum = 0.f;
        if (tok < tile.nt)
            for (int s = 0; s < k_splits; ++s) sum += v[((size_t)s * n_tokens + tile.t0 + tok) * v_stride + r];
        vs[tok][r] = sum;
    }
    __syncthreads();
    if (!valid) return;
    float acc[TILE_T];
#pragma unroll
    for (int j = 0; j < TILE_T; ++j) acc[j] = 0.f;
#pragma unroll
    for (int r = 0; r < RP; r += 4) {
        if (r >= tile.rank) break;
#pragma unroll
        for (int j = 0; j < TILE_T; ++j) {
            const float4 q = *reinterpret_cast<const float4 *>(&vs[j][r]);
            acc[j] += q.x * wp[r] + q.y * wp[r + 1] + q.z * wp[r + 2] + q.w * wp[r + 3];
        }
    }
    int r = RP;
#pragma unroll 4
    for (; r + 4 <= tile.rank; r += 4) {
        const float w0 = to_f32(b[(size_t)r * n_out]), w1 = to_f32(b[(size_t)(r + 1) * n_out]);
        const float w2 = to_f32(b[(size_t)(r + 2) * n_out]), w3 = to_f32(b[(size_t)(r + 3) * n_out]);
#pragma unroll
        for (int j = 0; j < TILE_T; ++j) {
            const float4 q = *reinterpret_cast<const float4 *>(&vs[j][r]);
            acc[j] += q.x * w0 + q.y * w1 + q.z * w2 + q.w * w3;
        }
    }
    for (; r < tile.rank; ++r) {
        const float w = to_f32(b[(size_t)r * n_out]);
#pragma unroll
        for (int j = 0; j < TILE_T; ++j) acc[j] += vs[j][r] * w;
    }
#pragma unroll
    for (int j = 0; j < TILE_T; ++j)
        if (j < tile.nt) store(acc[j], y + (size_t)(tile.t0 + j) * n_out + o);
}

#define LORA_SGMV(NAME, T)                                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                     \
        lora_shrink_##NAME(const T *x, const T *a, float *v, const int32_t *meta, int n_in, int n_tokens,     \
                           int v_stride) {                                                                    \
        shrink<T>(x, a, v, meta, n_in, n_tokens, v_stride);                                                   \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                     \
        lora_expand_##NAME(const float *v, const T *bt, T *y, const int32_t *meta, int n_out, int n_tokens,   \
                           int v_stride, int k_splits) {                                                      \
        expand<T>(v, bt, y, meta, n_out, n_tokens, v_stride, k_splits);                                       \
    }

LORA_SGMV(f32, float)
LORA_SGMV(bf16, __nv_bfloat16)

// ---- bf16 on tensor cores (mma.sync m16n8k16, f32 accumulation), ranks up to 64 ----------------
// The same tiles and the same split partials as above. A tile's 8 tokens are rows 0-7 of the
// 16-row mma (rows 8-15 zero). Needs in % 16 == 0, out % 8 == 0 and 16-byte aligned operands
// (checked by the host, which otherwise uses the kernels above).

#define K_BLOCK_MMA 256
#define MMA_MAX_RANK 64

__device__ __forceinline__ void mma_bf16(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t ld_pair(const __nv_bfloat16 *p) { return *reinterpret_cast<const uint32_t *>(p); }

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&h);
}

__device__ __forceinline__ uint32_t pack_raw(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

// Shrink on tensor cores, STEPS steps of 16 inputs from k (inputs at or past k_end count as
// zero): every fragment is loaded first (one memory latency), then acc += x·Aᵀ with M = the
// tile's tokens (row g of the mma, rows 8-15 zero), N = rank rows (8 per mma), K = inputs.
template <int STEPS>
__device__ __forceinline__ void shrink_steps(const __nv_bfloat16 *__restrict__ xr, bool row_ok,
                                             const __nv_bfloat16 *__restrict__ a, const Tile &tile, int n_in,
                                             int k, int k_end, int g, int tig, float acc[MMA_MAX_RANK / 8][4]) {
    const int n_tiles8 = (tile.rank + 7) / 8;
    uint32_t xa[STEPS][2], ab[STEPS][MMA_MAX_RANK / 8][2];
#pragma unroll
    for (int step = 0; step < STEPS; ++step) {
        const int kk = k + step * 16;
        const bool k_ok = kk < k_end;
        xa[step][0] = row_ok && k_ok ? ld_pair(xr + kk + tig * 2) : 0u;
        xa[step][1] = row_ok && k_ok ? ld_pair(xr + kk + tig * 2 + 8) : 0u;
#pragma unroll
        for (int n = 0; n < MMA_MAX_RANK / 8; ++n) {
            const int r = n * 8 + g;
            const bool ok = k_ok && n < n_tiles8 && r < tile.rank;
            const __nv_bfloat16 *ar = a + (size_t)(tile.row0 + (ok ? r : 0)) * n_in + kk + tig * 2;
            ab[step][n][0] = ok ? ld_pair(ar) : 0u;
            ab[step][n][1] = ok ? ld_pair(ar + 8) : 0u;
        }
    }
#pragma unroll
    for (int step = 0; step < STEPS; ++step) {
#pragma unroll
        for (int n = 0; n < MMA_MAX_RANK / 8; ++n) {
            if (n < n_tiles8) mma_bf16(acc[n], xa[step][0], 0u, xa[step][1], 0u, ab[step][n][0], ab[step][n][1]);
        }
    }
}

// Row g (a token) of a warp's shrink accumulators into red[g][rank row].
__device__ __forceinline__ void store_acc(float red[TILE_T][MMA_MAX_RANK], const float acc[MMA_MAX_RANK / 8][4],
                                         int rank, int g, int tig) {
    const int n_tiles8 = (rank + 7) / 8;
#pragma unroll
    for (int n = 0; n < MMA_MAX_RANK / 8; ++n) {
        if (n >= n_tiles8) break;
        red[g][n * 8 + tig * 2] = acc[n][0];
        red[g][n * 8 + tig * 2 + 1] = acc[n][1];
    }
}

// The mma B fragments of Bt rank rows k .. k + 15 for four 8-column tiles from colbase (columns
// at or past col_end, and rows past the rank, read as zero).
__device__ __forceinline__ void load_b_frags(const __nv_bfloat16 *__restrict__ bt, const Tile &tile, int n_out,
                                             int col_end, int colbase, int k, int g, int tig, uint32_t b[4][2]) {
    const int r0 = k + tig * 2;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int col = colbase + q * 8 + g;
        const bool col_ok = col < col_end;
        const __nv_bfloat16 *b_col = bt + (size_t)tile.row0 * n_out + (col_ok ? col : 0);
        const __nv_bfloat16 z = __float2bfloat16(0.f);
        auto at = [&](int r) { return col_ok && r < tile.rank ? b_col[(size_t)r * n_out] : z; };
        b[q][0] = pack_raw(at(r0), at(r0 + 1));
        b[q][1] = pack_raw(at(r0 + 8), at(r0 + 9));
    }
}

// grid (n_tiles, ceil(in / K_BLOCK_MMA)), block 256: warp w takes inputs [w * 32, w * 32 + 32)
// of the block's range in steps of 16, all its fragments loaded before the mmas; M = the tile's tokens, N = rank rows (8 per mma), K = in.
extern "C" __global__ void __launch_bounds__(THREADS)
    lora_shrink_mma_bf16(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ a,
                         float *__restrict__ v, const int32_t *__restrict__ meta, int n_in, int n_tokens,
                         int v_stride) {
    __shared__ float red[8][TILE_T][MMA_MAX_RANK];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tig = lane & 3;
    const Tile tile = read_tile(meta, blockIdx.x);
    const bool row_ok = g < tile.nt;
    const __nv_bfloat16 *xr = x + (size_t)(tile.t0 + (row_ok ? g : 0)) * n_in;
    float acc[MMA_MAX_RANK / 8][4];
#pragma unroll
    for (int n = 0; n < MMA_MAX_RANK / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    const int kw = blockIdx.y * K_BLOCK_MMA + warp * (K_BLOCK_MMA / 8);
    shrink_steps<K_BLOCK_MMA / 8 / 16>(xr, row_ok, a, tile, n_in, kw, n_in, g, tig, acc);
    store_acc(red[warp], acc, tile.rank, g, tig);
    __syncthreads();
    for (int i = tid; i < TILE_T * tile.rank; i += THREADS) {
        const int j = i / tile.rank, r = i % tile.rank;
        if (j >= tile.nt) continue;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < 8; ++w) sum += red[w][j][r];
        v[((size_t)blockIdx.y * n_tokens + tile.t0 + j) * v_stride + r] = sum * tile.scale;
    }
}

// grid (n_tiles, ceil(out / 256)), block 256: warp w owns 32 output columns (4 mma column tiles);
// M = the tile's tokens, N = outputs, K = rank (16 per mma, zero-padded).
extern "C" __global__ void __launch_bounds__(THREADS)
    lora_expand_mma_bf16(const float *__restrict__ v, const __nv_bfloat16 *__restrict__ bt,
                         __nv_bfloat16 *__restrict__ y, const int32_t *__restrict__ meta, int n_out, int n_tokens,
                         int v_stride, int k_splits) {
    __shared__ float vs[TILE_T][MMA_MAX_RANK + 4];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tig = lane & 3;
    const Tile tile = read_tile(meta, blockIdx.x);
    const int kpad = (tile.rank + 15) / 16 * 16;
    const int ow = blockIdx.y * THREADS + warp * 32;
    // B fragments for rank rows k .. k + 15 of the warp's four column tiles.
    auto load_b = [&](int k, uint32_t b[4][2]) { load_b_frags(bt, tile, n_out, n_out, ow, k, g, tig, b); };
    // The first rows' loads go out before the block gathers v.
    uint32_t bfrag[4][2];
    load_b(0, bfrag);
    for (int i = tid; i < TILE_T * kpad; i += THREADS) {
        const int tok = i / kpad, r = i % kpad;
        float sum = 0.f;
        if (tok < tile.nt && r < tile.rank) {
            const float *vp = v + ((size_t)tile.t0 + tok) * v_stride + r;
            const size_t split_stride = (size_t)n_tokens * v_stride;
#pragma unroll 8
            for (int s = 0; s < k_splits; ++s) sum += vp[s * split_stride];
        }
        vs[tok][r] = sum;
    }
    __syncthreads();
    if (ow >= n_out) return;
    float acc[4][4];
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[q][0] = acc[q][1] = acc[q][2] = acc[q][3] = 0.f;
    for (int k = 0; k < kpad; k += 16) {
        if (k > 0) load_b(k, bfrag);
        const uint32_t a0 = pack_bf16(vs[g][k + tig * 2], vs[g][k + tig * 2 + 1]);
        const uint32_t a2 = pack_bf16(vs[g][k + tig * 2 + 8], vs[g][k + tig * 2 + 9]);
#pragma unroll
        for (int q = 0; q < 4; ++q) mma_bf16(acc[q], a0, 0u, a2, 0u, bfrag[q][0], bfrag[q][1]);
    }
    if (g >= tile.nt) return;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int col = ow + q * 8 + tig * 2;
        if (col < n_out) {
            *reinterpret_cast<__nv_bfloat162 *>(y + (size_t)(tile.t0 + g) * n_out + col) =
                __floats2bfloat162_rn(acc[q][0], acc[q][1]);
        }
    }
}

// ---- bf16 fused: shrink and expand in one launch (sm_90 thread block clusters); opt-in ---------
// (cuda::USE_FUSED): on an H100 it measured slower than the two kernels above (22 vs 18 us on
// 256 tokens x 32 adapters r16, 4096 -> 4096): fewer, longer dependency chains per block.
// One cluster of FUSED_SPLITS blocks per tile. Block s of the cluster shrinks its share of the
// inputs for the tile's tokens on tensor cores (as lora_shrink_mma_bf16), the cluster sums the
// blocks' partial v through distributed shared memory (no round trip through global memory, no
// second launch), and block s then expands v into its share of the output columns (as
// lora_expand_mma_bf16). The first B fragments are loaded before the cluster waits for the
// partials. Same preconditions as the mma kernels; grid (FUSED_SPLITS, n_tiles).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>

#define FUSED_SPLITS 8
#define FUSED_BATCH 2

extern "C" __global__ void __cluster_dims__(FUSED_SPLITS, 1, 1) __launch_bounds__(THREADS, 2)
    lora_sgmv_fused_bf16(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ a,
                         const __nv_bfloat16 *__restrict__ bt, __nv_bfloat16 *__restrict__ y,
                         const int32_t *__restrict__ meta, int n_in, int n_out) {
    namespace cg = cooperative_groups;
    __shared__ float red[8][TILE_T][MMA_MAX_RANK];
    __shared__ float part[TILE_T * MMA_MAX_RANK];
    __shared__ float vs[TILE_T][MMA_MAX_RANK + 4];
    cg::cluster_group cluster = cg::this_cluster();
    const int split = (int)cluster.block_rank();
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tig = lane & 3;
    const Tile tile = read_tile(meta, blockIdx.y);
    const int kpad = (tile.rank + 15) / 16 * 16;

    // Expand's share: output columns [c0, c1), in groups of 32 per warp (four 8-column mma tiles).
    const int os = (n_out + FUSED_SPLITS * 8 - 1) / (FUSED_SPLITS * 8) * 8;
    const int c0 = split * os, c1 = min(n_out, c0 + os);
    auto load_b = [&](int colbase, int k, uint32_t b[4][2]) {
        load_b_frags(bt, tile, n_out, c1, colbase, k, g, tig, b);
    };
    // The expand fragments of the warp's first two column groups (rank rows 0-15) do not
    // depend on v: their loads go out now.
    uint32_t bf0[4][2], bf1[4][2];
    const int first_col = c0 + warp * 32;
    if (first_col < c1) load_b(first_col, 0, bf0);
    if (first_col + 256 < c1) load_b(first_col + 256, 0, bf1);

    // Shrink: this block's inputs [k0, k1), each warp a contiguous run of them in steps of 16.
    const int ks = (n_in + FUSED_SPLITS * 128 - 1) / (FUSED_SPLITS * 128) * 128;
    const int k1 = min(n_in, split * ks + ks);
    const int kw0 = split * ks + warp * (ks / 8), kw1 = min(k1, kw0 + ks / 8);
    const bool row_ok = g < tile.nt;
    const __nv_bfloat16 *xr = x + (size_t)(tile.t0 + (row_ok ? g : 0)) * n_in;
    float acc[MMA_MAX_RANK / 8][4];
#pragma unroll
    for (int n = 0; n < MMA_MAX_RANK / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    for (int kb = kw0; kb < kw1; kb += 16 * FUSED_BATCH)
        shrink_steps<FUSED_BATCH>(xr, row_ok, a, tile, n_in, kb, kw1, g, tig, acc);
    store_acc(red[warp], acc, tile.rank, g, tig);
    __syncthreads();
    for (int i = tid; i < TILE_T * tile.rank; i += THREADS) {
        const int j = i / tile.rank, r = i % tile.rank;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < 8; ++w) sum += red[w][j][r];
        part[j * MMA_MAX_RANK + r] = sum;
    }
    // Every block's partial is in its shared memory: sum them across the cluster.
    cluster.sync();
    for (int i = tid; i < TILE_T * kpad; i += THREADS) {
        const int j = i / kpad, r = i % kpad;
        float sum = 0.f;
        if (j < tile.nt && r < tile.rank) {
#pragma unroll
            for (int s = 0; s < FUSED_SPLITS; ++s) sum += cluster.map_shared_rank(part, s)[j * MMA_MAX_RANK + r];
        }
        vs[j][r] = sum * tile.scale;
    }
    // No block may leave (its shared memory with it) before the others have read it; this also
    // makes vs visible to the whole block.
    cluster.sync();

    for (int colbase = first_col, group = 0; colbase < c1; colbase += 8 * 32, ++group) {
        float o[4][4];
#pragma unroll
        for (int q = 0; q < 4; ++q) o[q][0] = o[q][1] = o[q][2] = o[q][3] = 0.f;
        for (int k = 0; k < kpad; k += 16) {
            uint32_t b[4][2];
            if (k == 0 && group == 0) {
#pragma unroll
                for (int q = 0; q < 4; ++q) b[q][0] = bf0[q][0], b[q][1] = bf0[q][1];
            } else if (k == 0 && group == 1) {
#pragma unroll
                for (int q = 0; q < 4; ++q) b[q][0] = bf1[q][0], b[q][1] = bf1[q][1];
            } else {
                load_b(colbase, k, b);
            }
            const uint32_t a0 = pack_bf16(vs[g][k + tig * 2], vs[g][k + tig * 2 + 1]);
            const uint32_t a2 = pack_bf16(vs[g][k + tig * 2 + 8], vs[g][k + tig * 2 + 9]);
#pragma unroll
            for (int q = 0; q < 4; ++q) mma_bf16(o[q], a0, 0u, a2, 0u, b[q][0], b[q][1]);
        }
        if (g < tile.nt) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int col = colbase + q * 8 + tig * 2;
                if (col < c1) {
                    *reinterpret_cast<__nv_bfloat162 *>(y + (size_t)(tile.t0 + g) * n_out + col) =
                        __floats2bfloat162_rn(o[q][0], o[q][1]);
                }
            }
        }
    }
}
#endif

// Benchmark helper: keeps the GPU busy for `cycles` clock ticks, so that the host can queue the
// launches to be timed behind it and events measure device time, not launch latency.
extern "C" __global__ void tandem_spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
}
