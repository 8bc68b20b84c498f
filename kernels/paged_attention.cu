// Paged attention and the KV cache write for tandem-kernels' `paged_attention` / `write_kv` ops.
//
// Attention: query token t (row of q [T, nh, HD]) at position pos[t] of its sequence attends to
// keys first(pos)..=pos of that sequence, where first = max(0, pos + 1 - window) with a sliding
// window and 0 without; key j of a sequence lives in cache slot table[j / bs] * bs + j % bs, and
// the caches are [slots, nkv, HD]. One kernel serves decode (one token per sequence), prefill
// chunks continuing a cached prefix, and mixed batches.
//
// Work list (host-built, one int4 per item): (sequence, first token, tokens, h0 | hn << 16): up to
// MAX_ROWS (token, query head) rows of one sequence that share one KV head — `tokens`
// consecutive query tokens times the `hn` query heads h0..h0+hn of the KV head's group.
// Grid (items, nkv); blockDim 32 * rows of the largest item; warp w owns row w (token w / hn,
// head w % hn) and keeps its softmax state (running max, sum, HD/32 output values per lane) in
// registers. The block walks the keys of its rows in tiles of TILE: all threads stage the tile's
// keys and values of its KV head in shared memory as f32, 16 bytes per load (each K and V element
// is read from the cache once per block, whatever the GQA group; the caches' rows must be 16-byte
// aligned, which the host checks), then each warp scores the tile with one key per
// lane (dot with the row's scaled query, staged in shared memory), updates its online softmax, and
// accumulates the tile's values, each lane owning output dims lane, lane + 32, ... Accumulation
// is f32 for f32 and bf16 inputs; the output is written once, in the input dtype.
//
// Split keys (flash-decoding): with gridDim.z = S > 1, block z walks only the z-th of S equal
// runs of its item's tiles and writes each row's unnormalised state — acc [HD] to
// part_acc[(row * S + z) * HD ..] and (m, l) to part_ml[(row * S + z) * 2 ..], row = token * nh +
// head — and paged_attention_combine merges the S states of each row (rescaling each by
// exp(m_z - max m)). A split whose tiles miss a row leaves (-inf, 0, 0), which the merge skips.
// The host picks S so that a batch of few items with long contexts (decode at small batch)
// still fills the GPU; S = 1 writes the output directly, as without splits.
//
// Write: slot[t] < 0 skips token t; else cache[slot[t], :] = src[t, :] (rows of nkv * HD).

#include <cuda_bf16.h>
#include "dtype.cuh"
#include <math.h>
#include <stdint.h>

#define TILE 32
#define MAX_ROWS 16


__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ int first_key(int pos, int window) {
    return window > 0 ? max(0, pos + 1 - window) : 0;
}

template <typename T, int VEC>
__device__ void paged_attention(const T *__restrict__ q, const T *__restrict__ kc, const T *__restrict__ vc,
                                T *__restrict__ out, const int4 *__restrict__ work, const int *__restrict__ positions,
                                const int *__restrict__ table_off, const int *__restrict__ tables, int nh, int nkv,
                                int bs, int window, float scale, float *__restrict__ part_acc,
                                float *__restrict__ part_ml) {
    constexpr int HD = 32 * VEC;
    __shared__ float ks[TILE][HD + 1];  // +1: lane j reads row j, conflict-free
    __shared__ float vs[TILE][HD];
    __shared__ float qs[MAX_ROWS][HD];

    const int4 item = work[blockIdx.x];
    const int g = blockIdx.y;
    const int seq = item.x, tok0 = item.y, nt = item.z;
    const int h0 = item.w & 0xffff, hn = item.w >> 16;
    const int group = nh / nkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rows = nt * hn;
    const bool active = warp < rows;
    const int tok = tok0 + (active ? warp / hn : 0);
    const int head = g * group + h0 + (active ? warp % hn : 0);
    const int pos = active ? positions[tok] : -1;
    const int first = first_key(max(pos, 0), window);

    // The block's key range: from the lowest first key to the highest position of its tokens.
    int lo = 0x7fffffff, hi = -1;
    for (int i = 0; i < nt; ++i) {
        const int p = positions[tok0 + i];
        lo = min(lo, first_key(p, window));
        hi = max(hi, p);
    }
    const int *table = tables + table_off[seq];

    if (active) {
        const T *qr = q + ((size_t)tok * nh + head) * HD;
#pragma unroll
        for (int v = 0; v < VEC; ++v) qs[warp][lane + 32 * v] = to_f32(qr[lane + 32 * v]) * scale;
    }
    float m = -INFINITY, l = 0.f, acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = 0.f;

    // This block's run of the item's tiles (all of them without splits; possibly none).
    const int t0 = lo - lo % TILE, ntiles = (hi - t0) / TILE + 1, splits = gridDim.z;
    const int per = (ntiles + splits - 1) / splits;
    const int tile_end = t0 + min(ntiles, ((int)blockIdx.z + 1) * per) * TILE;
    for (int ts = t0 + (int)blockIdx.z * per * TILE; ts < tile_end; ts += TILE) {
        __syncthreads();  // the previous tile is consumed (and qs is staged, on the first pass)
        // 16-byte chunks: EPV elements each, CPR per key row (compile-time: HD and T are).
        constexpr int EPV = 16 / sizeof(T), CPR = HD / EPV;
        for (int c = threadIdx.x; c < TILE * CPR; c += blockDim.x) {
            const int j = c / CPR, d0 = (c % CPR) * EPV, kj = ts + j;
            float kv[EPV], vv[EPV];
            if (kj >= lo && kj <= hi) {
                const size_t slot = (size_t)table[kj / bs] * bs + kj % bs;
                const size_t at = (slot * nkv + g) * HD + d0;
                load16(kc + at, kv);
                load16(vc + at, vv);
            } else {
#pragma unroll
                for (int i = 0; i < EPV; ++i) kv[i] = vv[i] = 0.f;
            }
#pragma unroll
            for (int i = 0; i < EPV; ++i) {
                ks[j][d0 + i] = kv[i];
                vs[j][d0 + i] = vv[i];
            }
        }
        __syncthreads();
        // Warps whose keys miss this tile skip it (their state is unchanged); the overlap of
        // [first, pos] with the tile is non-empty otherwise, so the tile's max is finite.
        if (!active || ts > pos || ts + TILE <= first) continue;
        const int kj = ts + lane;
        float s = -INFINITY;
        if (kj >= first && kj <= pos) {
            float dot = 0.f;
#pragma unroll 8
            for (int d = 0; d < HD; ++d) dot = fmaf(qs[warp][d], ks[lane][d], dot);
            s = dot;
        }
        const float m_new = fmaxf(m, warp_max(s));
        const float p = kj >= first && kj <= pos ? __expf(s - m_new) : 0.f;
        const float corr = __expf(m - m_new);  // 0 on the first tile (m = -inf)
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] *= corr;
#pragma unroll 4
        for (int j = 0; j < TILE; ++j) {
            const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[v] = fmaf(pj, vs[j][lane + 32 * v], acc[v]);
        }
        m = m_new;
    }
    if (!active) return;
    if (splits == 1) {
        T *o = out + ((size_t)tok * nh + head) * HD;
        const float inv = 1.f / l;
#pragma unroll
        for (int v = 0; v < VEC; ++v) store(acc[v] * inv, o + lane + 32 * v);
        return;
    }
    const size_t part = ((size_t)tok * nh + head) * splits + blockIdx.z;
#pragma unroll
    for (int v = 0; v < VEC; ++v) part_acc[part * HD + lane + 32 * v] = acc[v];
    if (lane == 0) {
        part_ml[2 * part] = m;
        part_ml[2 * part + 1] = l;
    }
}

// Merges the `splits` partial states of each of `rows` (token, head) rows: a warp per row, four
// rows per block of 128 threads, lane owning output dims lane, lane + 32, ...
template <typename T, int VEC>
__device__ void paged_attention_combine(T *__restrict__ out, const float *__restrict__ part_acc,
                                        const float *__restrict__ part_ml, int rows, int splits) {
    constexpr int HD = 32 * VEC;
    const int row = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float *ml = part_ml + (size_t)row * splits * 2;
    float m = -INFINITY;
    for (int z = 0; z < splits; ++z) m = fmaxf(m, ml[2 * z]);
    float l = 0.f, acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
    for (int z = 0; z < splits; ++z) {
        if (ml[2 * z] == -INFINITY) continue;  // no key of this row in split z
        const float w = __expf(ml[2 * z] - m);
        l = fmaf(w, ml[2 * z + 1], l);
        const float *a = part_acc + ((size_t)row * splits + z) * HD;
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] = fmaf(w, a[lane + 32 * v], acc[v]);
    }
    T *o = out + (size_t)row * HD;
    const float inv = 1.f / l;
#pragma unroll
    for (int v = 0; v < VEC; ++v) store(acc[v] * inv, o + lane + 32 * v);
}

#define PAGED_ATTENTION(SUFFIX, T, VEC)                                                                       \
    extern "C" __global__ void __launch_bounds__(32 * MAX_ROWS, 2)                                               \
        paged_attention_##SUFFIX(const T *q, const T *kc, const T *vc, T *out, const int4 *work,               \
                                 const int *positions, const int *table_off, const int *tables, int nh,       \
                                 int nkv, int bs, int window, float scale, float *part_acc, float *part_ml) { \
        paged_attention<T, VEC>(q, kc, vc, out, work, positions, table_off, tables, nh, nkv, bs, window, scale, \
                                part_acc, part_ml);                                                           \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(128) paged_attention_combine_##SUFFIX(                         \
        T *out, const float *part_acc, const float *part_ml, int rows, int splits) {                          \
        paged_attention_combine<T, VEC>(out, part_acc, part_ml, rows, splits);                                \
    }

PAGED_ATTENTION(f32_d32, float, 1)
PAGED_ATTENTION(f32_d64, float, 2)
PAGED_ATTENTION(f32_d96, float, 3)
PAGED_ATTENTION(f32_d128, float, 4)
PAGED_ATTENTION(bf16_d32, __nv_bfloat16, 1)
PAGED_ATTENTION(bf16_d64, __nv_bfloat16, 2)
PAGED_ATTENTION(bf16_d96, __nv_bfloat16, 3)
PAGED_ATTENTION(bf16_d128, __nv_bfloat16, 4)

// One block of 256 threads per token; row = nkv * HD elements.
template <typename T>
__device__ void write_kv(T *__restrict__ cache, const T *__restrict__ src, const int *__restrict__ slots, int row) {
    const int slot = slots[blockIdx.x];
    if (slot < 0) return;
    const T *s = src + (size_t)blockIdx.x * row;
    T *c = cache + (size_t)slot * row;
    for (int i = threadIdx.x; i < row; i += blockDim.x) c[i] = s[i];
}

extern "C" __global__ void write_kv_f32(float *cache, const float *src, const int *slots, int row) {
    write_kv(cache, src, slots, row);
}
extern "C" __global__ void write_kv_bf16(__nv_bfloat16 *cache, const __nv_bfloat16 *src, const int *slots, int row) {
    write_kv(cache, src, slots, row);
}
