#!/usr/bin/env bash
# Issue 7's GPU benchmark: a random-weight model of Llama-3.1-8B's shape (bf16) made with the
# PyTorch installed on the GPU host, tandem's benchmarks on it, and HF transformers + PEFT
# (../shared/bench/hf_peft_baseline.py: generate at batch 32, LoRA r16 all-linear training at seq
# 1024, batch 4) on the same shape in the same run:
#   decode at batch 1, 32, 128 with the fraction of the HBM roofline (weights + KV read per step
#     over the measured copy bandwidth), and what the fused element-wise kernels and split keys
#     in paged attention are each worth (the same batch without them);
#   token-level LoRA finetuning alone (r16 all-linear, seq 1024, batch 4): tokens/s and TFLOP/s;
#   multi-LoRA decode at batch 64: no adapter, one adapter, 64 distinct rank-16 adapters (q, v);
#   co-serving at TPOT SLO 45 ms under Poisson load at 3 rates: SLO attainment, share kept.
# Each step has its own time limit so the whole script stays within 8 minutes.
#
# Build here:   eval "$(scripts/cuda-toolchain.sh)"
#               cargo build --release --features cuda --target-dir target/cuda
# Run there:    scripts/gpu-bench.sh [path/to/tandem]   (default: target/cuda/release/tandem)
# Dry run of every step on a CPU host (a tiny model of the same structure, device cpu, no HF
# baseline), to check the script before spending GPU time:
#               GPU_BENCH_DRY_RUN=1 scripts/gpu-bench.sh target/release/tandem
set -uo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/cuda/release/tandem}"
dry="${GPU_BENCH_DRY_RUN:-}"
export LD_LIBRARY_PATH="/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -n "${OUT:-}" ]; then exec > >(tee "$OUT/gpu-bench.txt") 2>&1; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
status=0
start=$(date +%s)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
step() { # step NAME LIMIT_S CMD...: runs CMD under a time limit, prints how long it took
  local name="$1" limit="$2"; shift 2
  echo "## $name"
  local t0; t0=$(date +%s)
  timeout "$limit" "$@"; local rc=$?
  [ $rc -eq 124 ] && echo "(stopped after ${limit} s)"
  [ $rc -ne 0 ] && status=1
  echo "(${name}: $(( $(date +%s) - t0 )) s, rc $rc)"
}

llama8b='{"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
  "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192, "rope_theta": 500000.0,
  "tie_word_embeddings": false}'

device=cuda
if [ -n "$dry" ]; then
  llama8b='{"vocab_size": 512, "hidden_size": 128, "intermediate_size": 448, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 1, "max_position_embeddings": 8192, "rope_theta": 500000.0,
    "tie_word_embeddings": false}'
  device=cpu
fi

baseline=""
for f in ../shared/bench/hf_peft_baseline.py "$(dirname "$bin")/hf_peft_baseline.py"; do
  [ -f "$f" ] && baseline="$f" && break
done
if [ -n "$dry" ]; then
  echo "dry run: HF baselines skipped"
elif [ -n "$baseline" ]; then
  step "HF transformers + PEFT, same machine, same run ($baseline)" 110 python3 "$baseline" llama8b
else
  echo "hf_peft_baseline.py not found: HF baselines skipped"
fi

model="$work/llama8b"
step "random Llama-3.1-8B-shape weights (bf16)" 60 python3 scripts/random_llama.py "$model" "$llama8b" bf16
m=(--model "$model" --device "$device")
# --ablate: each batch size again without the fused element-wise kernels and without split keys.
step "decode at batch 1, 32, 128 (prompt 512)" 90 \
  "$bin" bench decode "${m[@]}" --batch-sizes 1,32,128 --prompt-len 512 --steps 16 --no-reference --ablate
step "token-level LoRA finetuning alone (r16 all-linear, seq 1024, batch 4)" 60 \
  "$bin" bench finetune "${m[@]}" --seq-len 1024 --batch-size 4 --steps 1 --chunk-tokens 256 --no-reference
# q_proj,v_proj (PEFT's default): 64 all-linear adapters of this shape would be 10.7 GB of random
# weights to write and load, more than this step's time.
step "multi-LoRA decode at batch 64: no adapter, one, 64 distinct (r16 on q_proj,v_proj)" 50 \
  "$bin" bench lora "${m[@]}" --batch 64 --adapters 0,1,64 --rank 16 --targets q_proj,v_proj \
  --prompt-len 128 --steps 16
step "co-serving at TPOT SLO 45 ms (job: LoRA r16 q/v, 1024-token sequences)" 130 \
  "$bin" bench coserve "${m[@]}" --secs 8 --tpot-slo-ms 45 --ttft-slo-ms 2000 --max-num-seqs 64 \
  --max-batched-tokens 2048 --prompt-len 128 --output-len 128 --train-len 1024 --chunk-tokens 256 \
  --temporal-every 8
echo "gpu-bench: $(( $(date +%s) - start )) s, exit status $status"
exit $status
