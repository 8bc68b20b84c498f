// Fused element-wise kernels for tandem-kernels' `elementwise` ops: what the Llama forward ran
// as several candle kernels per layer, each reading and writing the activations again.
//
// add_rms_norm: sum = x + r (rounded to the element type, as a separate add would store it),
// normed = sum * rsqrt(mean(sum^2) + eps) * w; one block per row, f32 accumulation. The output
// is one buffer [2, rows, hidden]: sums first, then the normed rows.
//
// swiglu: out = silu(g) * u = g / (1 + exp(-g)) * u in f32, rounded once.

#include <cuda_bf16.h>
#include "dtype.cuh"
#include <math.h>
#include <stdint.h>

#define NORM_THREADS 256

__device__ __forceinline__ float warp_sum_ew(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum of `v` over the block's NORM_THREADS threads, returned to every thread.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[NORM_THREADS / 32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    v = warp_sum_ew(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < NORM_THREADS / 32; ++i) total += partial[i];
    return total;
}

template <typename T>
__device__ void add_rms_norm(const T *__restrict__ x, const T *__restrict__ r, const T *__restrict__ w,
                             T *__restrict__ out, int rows, int hidden, float eps) {
    const size_t row = blockIdx.x;
    const T *xr = x + row * hidden, *rr = r + row * hidden;
    T *sum = out + row * hidden, *normed = out + ((size_t)rows + row) * hidden;
    float sq = 0.f;
    for (int i = threadIdx.x; i < hidden; i += NORM_THREADS) {
        store(to_f32(xr[i]) + to_f32(rr[i]), sum + i);
        const float s = to_f32(sum[i]);  // this thread's own store: the rounded sum
        sq = fmaf(s, s, sq);
    }
    const float inv = rsqrtf(block_sum(sq) / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += NORM_THREADS) store(to_f32(sum[i]) * inv * to_f32(w[i]), normed + i);
}

template <typename T>
__device__ void swiglu(const T *__restrict__ g, const T *__restrict__ u, T *__restrict__ out, int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float gv = to_f32(g[i]);
        store(gv / (1.f + __expf(-gv)) * to_f32(u[i]), out + i);
    }
}

#define ELEMENTWISE(SUFFIX, T)                                                                              \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                              \
        add_rms_norm_##SUFFIX(const T *x, const T *r, const T *w, T *out, int rows, int hidden, float eps) { \
        add_rms_norm<T>(x, r, w, out, rows, hidden, eps);                                                   \
    }                                                                                                       \
    extern "C" __global__ void swiglu_##SUFFIX(const T *g, const T *u, T *out, int64_t n) { swiglu<T>(g, u, out, n); }

ELEMENTWISE(f32, float)
ELEMENTWISE(bf16, __nv_bfloat16)
