#!/usr/bin/env bash
# Issue 7's GPU benchmark (first version): random-weight models of real shapes made with the
# PyTorch installed on the GPU host (SmolLM2-135M and Llama-3.1-8B, bf16), tandem's decode
# benchmark on them, and HF transformers + PEFT (../shared/bench/hf_peft_baseline.py: generate at
# batch 32, LoRA r16 all-linear training at seq 1024, batch 4) on the same shapes in the same run.
# Still to come (issue 7): finetuning and co-serving on the 8B shape, one summary table.
#
# Build here:   eval "$(scripts/cuda-toolchain.sh)"
#               cargo build --release --features cuda --target-dir target/cuda
# Run there:    scripts/gpu-bench.sh [path/to/tandem]   (default: target/cuda/release/tandem)
set -uo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/cuda/release/tandem}"
export LD_LIBRARY_PATH="/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -n "${OUT:-}" ]; then exec > >(tee "$OUT/gpu-bench.txt") 2>&1; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
status=0
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

smollm2='{"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
  "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192, "rope_theta": 100000.0,
  "tie_word_embeddings": true}'
llama8b='{"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
  "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192, "rope_theta": 500000.0,
  "tie_word_embeddings": false}'

baseline=""
for f in ../shared/bench/hf_peft_baseline.py "$(dirname "$bin")/hf_peft_baseline.py"; do
  [ -f "$f" ] && baseline="$f" && break
done
if [ -n "$baseline" ]; then
  echo "## HF transformers + PEFT, same machine, same run ($baseline)"
  python3 "$baseline" smollm2 llama8b || status=1
else
  echo "hf_peft_baseline.py not found: HF baselines skipped"
fi

for shape in smollm2 llama8b; do
  echo "## tandem bench decode, $shape shape, random bf16 weights"
  dir="$work/$shape"
  t0=$(date +%s)
  python3 scripts/random_llama.py "$dir" "${!shape}" bf16 || { status=1; continue; }
  echo "(weights written in $(( $(date +%s) - t0 )) s)"
  sizes=1,32,128
  [ "$shape" = llama8b ] && sizes=1,32
  "$bin" bench decode --model "$dir" --device cuda --batch-sizes "$sizes" --prompt-len 128 --steps 16 \
    --no-reference || status=1
  rm -rf "$dir"
done
echo "gpu-bench exit status: $status"
exit $status
