#!/usr/bin/env bash
# GPU host check (no compiler needed there): kernel checks (multi-LoRA SGMV, paged attention)
# against the float64 CPU reference,
# kernel timings (CUDA events) beside the base GEMM, PyTorch baselines in the same run, HF PEFT
# interop through the CUDA engine, and the whole engine on CUDA vs CPU on a random-weight model.
# Prints tables to stdout (and to $OUT/gpu-check.txt when OUT is set); record them in
# docs/benchmarks.md.
#
# Build here:   eval "$(scripts/cuda-toolchain.sh)"
#               cargo build --release --features cuda --target-dir target/cuda
# Run there:    scripts/gpu-check.sh [path/to/tandem]   (default: target/cuda/release/tandem)
set -uo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/cuda/release/tandem}"
export LD_LIBRARY_PATH="/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -n "${OUT:-}" ]; then exec > >(tee "$OUT/gpu-check.txt") 2>&1; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' || true
status=0

echo "## lora_sgmv: checks and timings (tandem bench kernels --device cuda)"
"$bin" bench kernels --device cuda || status=1

echo "## paged_attention / write_kv: checks vs float64 and 8B-shape timings (tandem bench attention --device cuda)"
"$bin" bench attention --device cuda || status=1

# ../shared/bench/lora_baseline.py, or a copy next to the binary (when only the repo travels).
baseline=""
for f in ../shared/bench/lora_baseline.py "$(dirname "$bin")/lora_baseline.py"; do
  [ -f "$f" ] && baseline="$f" && break
done
if [ -n "$baseline" ]; then
  echo "## PyTorch baselines, same machine, same run ($baseline)"
  python3 "$baseline" || status=1
else
  echo "lora_baseline.py not found: PyTorch baselines skipped"
fi

echo "## HF transformers + PEFT vs tandem on CUDA (f32): greedy tokens, base and adapters"
python3 scripts/peft-interop.py "$bin" --device cuda --dtype f32 || status=1

random_llama() { python3 scripts/random_llama.py "$@"; }

echo "## the engine on CUDA: a random-weight Llama (transformers), greedy, CPU vs CUDA"
tmp="$(mktemp -d)"
random_llama "$tmp" '{"vocab_size": 512, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
  "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 1024}' || status=1
run() { "$bin" generate --model "$tmp" --no-chat --prompt "w1 w2 w3 w4" --max-tokens 24 "$@"; }
cpu="$(run --device cpu)" || status=1
cuda32="$(run --device cuda --dtype f32)" || status=1
cuda16="$(run --device cuda)" || status=1
echo "cpu f32:   $cpu"
echo "cuda f32:  $cuda32"
echo "cuda bf16: $cuda16"
if [ "$cpu" = "$cuda32" ]; then echo "ok   cuda f32 greedy == cpu f32"; else echo "FAIL cuda f32 greedy != cpu f32"; status=1; fi

echo "## token-level finetuning: the same run on CPU and on CUDA (f32): losses and gradient norms per step"
scripts/gpu-finetune-check.sh "$bin" "$tmp" || status=1
rm -rf "$tmp"

echo "## co-serving on the GPU: a random-weight model of SmolLM2-135M's shape, bf16 (tandem bench coserve)"
smol="$(mktemp -d)"
random_llama "$smol" '{"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
  "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048, "rope_theta": 100000.0,
  "tie_word_embeddings": true}' bf16 || status=1
timeout 300 "$bin" bench coserve --model "$smol" --device cuda --secs 6 --tpot-slo-ms 50 --ttft-slo-ms 1000 \
  --max-num-seqs 32 --chunk-tokens 128 || status=1
rm -rf "$smol"
echo "gpu-check exit status: $status"
exit $status
