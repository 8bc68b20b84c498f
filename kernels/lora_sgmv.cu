// Batched multi-LoRA (SGMV semantics) for tandem-kernels' `lora_sgmv` op.
//
// For every token t that belongs to a segment s with an adapter:
//   h[t, r] = scale[s] * sum_i x[t, i] * A[row_offset[s] + r, i]          (shrink, r < rank[s])
//   y[t, o] = sum_r h[t, r] * Bt[row_offset[s] + r, o]                     (expand)
// A ([rows, in]) and Bt ([rows, out], lora_B transposed) are per-projection pools holding each
// resident adapter's rank rows. Tokens outside adapter segments get y = 0. Ranks differ per
// segment; each computes with its own rank. Accumulation is in f32 for every input type.
//
// Launch: shrink grid (T, max_rank), block 128; expand grid (T, ceil(out / 256)), block 256.
// h is an f32 scratch buffer [T, max_rank].

#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void from_f32(float v, float *out) { *out = v; }
__device__ __forceinline__ void from_f32(float v, __nv_bfloat16 *out) { *out = __float2bfloat16(v); }

template <typename T>
__device__ void shrink(const T *x, const T *a, float *h, const int32_t *token_seg, const int32_t *row_offset,
                       const int32_t *rank, const float *scale, int n_in, int max_rank) {
    const int t = blockIdx.x;
    const int r = blockIdx.y;
    const int s = token_seg[t];
    if (s < 0 || r >= rank[s]) {
        if (threadIdx.x == 0) h[(size_t)t * max_rank + r] = 0.f;
        return;
    }
    const T *xr = x + (size_t)t * n_in;
    const T *ar = a + (size_t)(row_offset[s] + r) * n_in;
    float acc = 0.f;
    for (int i = threadIdx.x; i < n_in; i += blockDim.x) acc += to_f32(xr[i]) * to_f32(ar[i]);
    // Block reduction: warp shuffles, then one warp over the warp sums.
    __shared__ float warp_sums[32];
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffff, acc, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        const int n_warps = (blockDim.x + 31) >> 5;
        acc = lane < n_warps ? warp_sums[lane] : 0.f;
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffff, acc, off);
        if (lane == 0) h[(size_t)t * max_rank + r] = acc * scale[s];
    }
}

template <typename T>
__device__ void expand(const float *h, const T *bt, T *y, const int32_t *token_seg, const int32_t *row_offset,
                       const int32_t *rank, int n_out, int max_rank) {
    const int t = blockIdx.x;
    const int o = blockIdx.y * blockDim.x + threadIdx.x;
    if (o >= n_out) return;
    const int s = token_seg[t];
    float acc = 0.f;
    if (s >= 0) {
        const float *hr = h + (size_t)t * max_rank;
        const T *b = bt + (size_t)row_offset[s] * n_out + o;
        for (int r = 0; r < rank[s]; ++r) acc += hr[r] * to_f32(b[(size_t)r * n_out]);
    }
    from_f32(acc, y + (size_t)t * n_out + o);
}

#define LORA_SGMV(NAME, T)                                                                                     \
    extern "C" __global__ void lora_shrink_##NAME(const T *x, const T *a, float *h, const int32_t *token_seg,  \
                                                  const int32_t *row_offset, const int32_t *rank,              \
                                                  const float *scale, int n_in, int max_rank) {                \
        shrink<T>(x, a, h, token_seg, row_offset, rank, scale, n_in, max_rank);                                \
    }                                                                                                          \
    extern "C" __global__ void lora_expand_##NAME(const float *h, const T *bt, T *y, const int32_t *token_seg, \
                                                  const int32_t *row_offset, const int32_t *rank, int n_out,   \
                                                  int max_rank) {                                              \
        expand<T>(h, bt, y, token_seg, row_offset, rank, n_out, max_rank);                                     \
    }

LORA_SGMV(f32, float)
LORA_SGMV(bf16, __nv_bfloat16)
