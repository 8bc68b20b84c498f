// Helpers the emulated checks (kernels/emu/*_emu.cpp) share.
#pragma once
#include <cuda_bf16.h>

// `v` as the element type T holds it (bf16: rounded to nearest even, as the device rounds).
template <typename T>
T cvt(float v);
template <>
inline float cvt<float>(float v) { return v; }
template <>
inline __nv_bfloat16 cvt<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
