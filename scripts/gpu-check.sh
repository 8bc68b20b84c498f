#!/usr/bin/env bash
# GPU host check (no compiler needed there): kernel checks (multi-LoRA SGMV, paged attention)
# against the float64 CPU reference, kernel timings (CUDA events) beside the base GEMM, PyTorch
# baselines in the same run, HF PEFT interop through the CUDA engine, the whole engine and
# token-level finetuning on CUDA vs CPU on a random-weight model, and a co-serving run.
# Prints tables to stdout (and to $OUT/gpu-check.txt when OUT is set); record them in
# docs/benchmarks.md.
#
# Build here:   eval "$(scripts/cuda-toolchain.sh)"
#               cargo build --release --features cuda --target-dir target/cuda
# Run there:    scripts/gpu-check.sh [path/to/tandem] [SECTION ...]
#               (default binary: target/cuda/release/tandem; default: every section, in order)
# Sections, each under its own time limit (seconds):
#   attention 120   paged attention + write_kv checks vs float64, 8B-shape timings
#   engine     90   a random Llama: greedy tokens CPU f32 vs CUDA f32, and the logits at every
#                   position vs CUDA f32 (1e-4; with and without the fused element-wise kernels)
#                   and CUDA bf16 (5e-2 of the largest logit)
#   finetune  120   the same finetuning run on CPU and CUDA: per-step loss and gradient norm
#   kernels   150   multi-LoRA SGMV checks and timings beside the base GEMM
#   baselines 120   PyTorch baselines for the SGMV shapes (../shared/bench/lora_baseline.py)
#   interop   180   HF transformers + PEFT vs tandem on CUDA: greedy tokens, base and adapters
#   coserve   300   co-serving on a random SmolLM2-135M-shape model, bf16
# The first three are the checks that have never run on a GPU (session 4-5 work); the others
# passed in session 3. A short session: `scripts/gpu-check.sh BIN attention engine finetune`.
set -uo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/cuda/release/tandem}"
shift || true
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(attention engine finetune kernels baselines interop coserve)
export LD_LIBRARY_PATH="/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -n "${OUT:-}" ]; then exec > >(tee "$OUT/gpu-check.txt") 2>&1; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' || true
status=0
start=$(date +%s)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# A small random Llama (transformers) for the engine and finetuning checks, made once.
small_model() {
  small="$work/small"
  if [ ! -f "$small/config.json" ]; then
    python3 scripts/random_llama.py "$small" '{"vocab_size": 512, "hidden_size": 256, "intermediate_size": 688,
      "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 1024}' ||
      { echo "FAIL cannot write the random model"; status=1; return 1; }
  fi
}

# ../shared/bench/NAME, or a copy next to the binary (when only the repo travels).
shared_script() {
  for f in "../shared/bench/$1" "$(dirname "$bin")/$1"; do
    [ -f "$f" ] && echo "$f" && return 0
  done
  return 1
}

section_attention() {
  "$bin" bench attention --device cuda
}

section_engine() {
  small_model || return 1
  run() { "$bin" generate --model "$small" --no-chat --prompt "w1 w2 w3 w4" --max-tokens 24 "$@"; }
  local cpu cuda32 cuda16
  cpu="$(run --device cpu)" || return 1
  cuda32="$(run --device cuda --dtype f32)" || return 1
  cuda16="$(run --device cuda)" || return 1
  echo "cpu f32:   $cpu"
  echo "cuda f32:  $cuda32"
  echo "cuda bf16: $cuda16"
  local ok=0
  if [ "$cpu" = "$cuda32" ]; then echo "ok   cuda f32 greedy == cpu f32"; else echo "FAIL cuda f32 greedy != cpu f32"; ok=1; fi
  # Logits at every position of a 40-token prompt: CUDA f32 within 1e-4 and CUDA bf16 (weights
  # rounded to bf16) within 5e-2 of the CPU's, relative to the largest |logit|.
  local prompt; prompt="$(python3 -c 'print(" ".join(f"w{(i * 53 + 11) % 512}" for i in range(40)))')"
  logits() { "$bin" bench logits --model "$small" --prompt "$prompt" "$@"; }
  # cuda32u: f32 with candle's separate ops instead of the fused element-wise kernels (TANDEM_CUDA_UNFUSED=1),
  # so a failure names the fused kernels or clears them.
  logits --device cpu > "$work/logits-cpu.json" && logits --device cuda --dtype f32 > "$work/logits-cuda32.json" &&
    TANDEM_CUDA_UNFUSED=1 logits --device cuda --dtype f32 > "$work/logits-cuda32u.json" &&
    logits --device cuda --dtype bf16 > "$work/logits-cuda16.json" || return 1
  python3 - "$work" <<'PY' || ok=1
import json, sys
d = sys.argv[1]
cpu = json.load(open(f"{d}/logits-cpu.json"))
bad = False
for name, tol in (("cuda32", 1e-4), ("cuda32u", 1e-4), ("cuda16", 5e-2)):
    other = json.load(open(f"{d}/logits-{name}.json"))
    assert other["tokens"] == cpu["tokens"]
    scale = max(abs(x) for row in cpu["logits"] for x in row)
    err = max(abs(a - b) for r1, r2 in zip(cpu["logits"], other["logits"]) for a, b in zip(r1, r2)) / scale
    ok = err <= tol and len(other["logits"]) == len(cpu["logits"])
    bad |= not ok
    print(f"{'ok  ' if ok else 'FAIL'} logits {name} vs cpu f32 over {len(cpu['logits'])} positions: max |diff| / max |logit| {err:.2e} (limit {tol:g})")
sys.exit(1 if bad else 0)
PY
  return $ok
}

section_finetune() {
  small_model || return 1
  scripts/gpu-finetune-check.sh "$bin" "$small"
}

section_kernels() {
  "$bin" bench kernels --device cuda
}

section_baselines() {
  local f
  f="$(shared_script lora_baseline.py)" || { echo "lora_baseline.py not found: PyTorch baselines skipped"; return 0; }
  python3 "$f"
}

section_interop() {
  python3 scripts/peft-interop.py "$bin" --device cuda --dtype f32
}

section_coserve() {
  local smol="$work/smol"
  python3 scripts/random_llama.py "$smol" '{"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
    "rope_theta": 100000.0, "tie_word_embeddings": true}' bf16 || return 1
  "$bin" bench coserve --model "$smol" --device cuda --secs 6 --tpot-slo-ms 50 --ttft-slo-ms 1000 \
    --max-num-seqs 32 --chunk-tokens 128
}

declare -A limit=([attention]=120 [engine]=90 [finetune]=120 [kernels]=150 [baselines]=120 [interop]=180 [coserve]=300)
declare -A title=(
  [attention]="paged_attention / write_kv: checks vs float64 and 8B-shape timings (tandem bench attention --device cuda)"
  [engine]="the engine on CUDA: a random-weight Llama (transformers), greedy, CPU vs CUDA"
  [finetune]="token-level finetuning: the same run on CPU and on CUDA (f32): losses and gradient norms per step"
  [kernels]="lora_sgmv: checks and timings (tandem bench kernels --device cuda)"
  [baselines]="PyTorch baselines, same machine, same run (lora_baseline.py)"
  [interop]="HF transformers + PEFT vs tandem on CUDA (f32): greedy tokens, base and adapters"
  [coserve]="co-serving on the GPU: a random-weight model of SmolLM2-135M's shape, bf16 (tandem bench coserve)"
)
for s in "${sections[@]}"; do
  if [ -z "${limit[$s]:-}" ]; then
    echo "unknown section \`$s\` (attention engine finetune kernels baselines interop coserve)"
    status=1
    continue
  fi
  echo "## ${title[$s]}"
  t0=$(date +%s)
  # A section runs in a subshell under its own time limit; its functions and variables are
  # exported through `declare -f`.
  timeout "${limit[$s]}" bash -c "$(declare -f small_model shared_script "section_$s"); bin='$bin'; work='$work'; section_$s"
  rc=$?
  [ $rc -eq 124 ] && echo "(stopped after ${limit[$s]} s)"
  [ $rc -ne 0 ] && status=1
  echo "($s: $(( $(date +%s) - t0 )) s, rc $rc)"
done
echo "gpu-check: $(( $(date +%s) - start )) s, exit status $status"
exit $status
