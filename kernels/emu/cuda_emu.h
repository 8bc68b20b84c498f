// A CPU emulator for the CUDA C subset tandem's kernels use, to run kernels/*.cu on a machine
// without a GPU (scripts/kernel-emu.sh). Blocks run one at a time, in order, each on blockDim.x OS
// threads; __syncthreads is a barrier over the block's threads, and warp shuffles
// exchange through a per-warp buffer between two barriers over the warp's 32 threads. So it
// checks indexing, shared-memory use, synchronisation and warp reductions — not timing, and
// only for kernels whose warps reach every shuffle together (true of tandem's). Kernels read
// 16-byte vectors through reinterpret_cast as CUDA code does: build with -fno-strict-aliasing.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time, so a function-static array is the block's shared memory.
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct int4 {
    int x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {
struct Warp {
    std::barrier<> bar{32};
    float vals[32];
};
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<std::unique_ptr<Warp>> warps;

inline float exchange(float v, int src_lane) {
    Warp &w = *warps[threadIdx.x / 32];
    int lane = threadIdx.x % 32;
    w.vals[lane] = v;
    w.bar.arrive_and_wait();
    float r = w.vals[src_lane & 31];
    w.bar.arrive_and_wait();
    return r;
}

// Runs `kernel` over `grid` blocks of `block` threads (block.x a multiple of 32, y = z = 1):
// block.x threads, each running its part of every block in turn, with a barrier between blocks
// (shared memory is reused only once the whole block is done).
template <class F>
void launch(dim3 grid, dim3 block, F kernel) {
    blockDim = block;
    gridDim = grid;
    block_bar = std::make_unique<std::barrier<>>(block.x);
    std::barrier<> done(block.x);
    warps.clear();
    for (unsigned w = 0; w < (block.x + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block.x; ++t)
        threads.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            for (unsigned bz = 0; bz < grid.z; ++bz)
                for (unsigned by = 0; by < grid.y; ++by)
                    for (unsigned bx = 0; bx < grid.x; ++bx) {
                        blockIdx = {bx, by, bz};
                        kernel();
                        done.arrive_and_wait();
                    }
        });
    for (auto &th : threads) th.join();
}
}  // namespace emu

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int mask) {
    return emu::exchange(v, int(threadIdx.x % 32) ^ mask);
}
inline float __shfl_sync(unsigned, float v, int src) { return emu::exchange(v, src); }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
using std::fmaf;
using std::fmaxf;
using std::max;
using std::min;
