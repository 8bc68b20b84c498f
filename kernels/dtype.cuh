// Loads and stores between f32 (the accumulation type) and each element type the kernels take,
// shared by kernels/*.cu (included; not compiled on its own).
#pragma once
#include <cuda_bf16.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(float v, float *out) { *out = v; }
__device__ __forceinline__ void store(float v, __nv_bfloat16 *out) { *out = __float2bfloat16(v); }

// Sixteen bytes of a row as f32: 4 f32 or 8 bf16 elements (p 16-byte aligned). bf16 -> f32 is
// the 16 bits shifted up, so the 8 values come out of the 4 words directly.
__device__ __forceinline__ void load16(const float *p, float (&o)[4]) {
    const float4 v = *reinterpret_cast<const float4 *>(p);
    o[0] = v.x;
    o[1] = v.y;
    o[2] = v.z;
    o[3] = v.w;
}
__device__ __forceinline__ void load16(const __nv_bfloat16 *p, float (&o)[8]) {
    const uint4 v = *reinterpret_cast<const uint4 *>(p);
    o[0] = __uint_as_float(v.x << 16);
    o[1] = __uint_as_float(v.x & 0xffff0000u);
    o[2] = __uint_as_float(v.y << 16);
    o[3] = __uint_as_float(v.y & 0xffff0000u);
    o[4] = __uint_as_float(v.z << 16);
    o[5] = __uint_as_float(v.z & 0xffff0000u);
    o[6] = __uint_as_float(v.w << 16);
    o[7] = __uint_as_float(v.w & 0xffff0000u);
}
