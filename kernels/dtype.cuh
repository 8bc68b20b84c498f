// Loads and stores between f32 (the accumulation type) and each element type the kernels take,
// shared by kernels/*.cu (included; not compiled on its own).
#pragma once
#include <cuda_bf16.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(float v, float *out) { *out = v; }
__device__ __forceinline__ void store(float v, __nv_bfloat16 *out) { *out = __float2bfloat16(v); }
