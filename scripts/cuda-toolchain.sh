#!/usr/bin/env bash
# Installs nvcc 13.0 from PyPI into .cuda/ (no GPU or system CUDA needed) and prepares a
# CUDA_HOME there, so that `cargo build --features cuda` works on a CPU-only machine.
# Pinned: unpinned pulls 13.5, whose PTX a CUDA 13.0 driver cannot load.
# Usage: source <(scripts/cuda-toolchain.sh)   # prints the exports to use
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.cuda/py"
if [ ! -x "$dest/nvidia/cu13/bin/nvcc" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$dest" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
fi
home="$dest/nvidia/cu13"
[ -e "$home/lib64" ] || ln -s lib "$home/lib64"
[ -e "$home/lib/libcudart.so" ] || ln -s libcudart.so.13 "$home/lib/libcudart.so"
# nvvm's cicc is looked up under $CUDA_HOME/nvvm
if [ ! -e "$home/nvvm" ] && [ -d "$dest/nvidia/cu13/nvvm" ]; then :; fi
echo "export CUDA_HOME=$home"
echo "export CUDA_ROOT=$home"
echo "export PATH=$home/bin:\$PATH"
echo "export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}"
