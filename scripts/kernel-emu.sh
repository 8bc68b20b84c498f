#!/usr/bin/env bash
# Runs the CUDA kernels of kernels/ on the CPU through kernels/emu/cuda_emu.h (each block as OS
# threads, real barriers for __syncthreads and warp shuffles) against a float64 reference, so
# a kernel's indexing and synchronisation are checked on machines without a GPU (CI runs it).
# Covers kernels/paged_attention.cu (paged attention, f32 and bf16, with and without split keys,
# and write_kv) and kernels/elementwise.cu (add_rms_norm, swiglu); the multi-LoRA kernels use tensor-core PTX the emulator cannot run
# (scripts/gpu-check.sh checks them on a GPU). Needs a C++20 compiler (g++ 10+ or clang++ 13+).
set -euo pipefail
cd "$(dirname "$0")/.."
cxx="${CXX:-$(command -v g++ || command -v clang++ || true)}"
if [ -z "$cxx" ]; then
  echo "kernel-emu: no C++ compiler (install g++)" >&2
  exit 1
fi
out="target/kernel-emu"
mkdir -p "$out"
for emu in paged_attention elementwise; do
  "$cxx" -std=c++20 -O2 -fno-strict-aliasing -pthread -Ikernels/emu/include -Wall -Wno-unknown-pragmas \
    -o "$out/${emu}_emu" "kernels/emu/${emu}_emu.cpp"
  "$out/${emu}_emu"
done
