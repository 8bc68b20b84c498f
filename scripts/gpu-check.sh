#!/usr/bin/env bash
# GPU host check (no compiler needed there): kernel checks against the float64 CPU reference,
# kernel timings beside the base GEMM, PyTorch baselines in the same run, and the whole engine
# on CUDA on a random-weight model. Prints tables to stdout; record them in docs/benchmarks.md.
#
# Build here:   eval "$(scripts/cuda-toolchain.sh)" && cargo build --release --features cuda
# Run there:    scripts/gpu-check.sh [path/to/tandem]   (default: target/release/tandem)
set -uo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/tandem}"
export LD_LIBRARY_PATH="/usr/local/cuda/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
status=0

echo "## lora_sgmv: checks and timings (tandem bench kernels --device cuda)"
"$bin" bench kernels --device cuda || status=1

if [ -f ../shared/bench/lora_baseline.py ]; then
  echo "## PyTorch baselines, same machine, same run (../shared/bench/lora_baseline.py)"
  python3 ../shared/bench/lora_baseline.py || status=1
fi

echo "## the engine on CUDA: a random-weight Llama (transformers), greedy, CPU vs CUDA"
tmp="$(mktemp -d)"
python3 - "$tmp" <<'PY' || status=1
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
d = sys.argv[1]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
vocab = {f"w{i}": i for i in range(512)}
json.dump({"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}}, open(f"{d}/tokenizer.json", "w"))
PY
for dev in cpu cuda; do
  echo "--device $dev:"
  "$bin" generate --model "$tmp" --device "$dev" --no-chat --prompt "w1 w2 w3 w4" --max-tokens 16 || status=1
done
rm -rf "$tmp"
exit $status
