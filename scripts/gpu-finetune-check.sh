#!/usr/bin/env bash
# The same `tandem finetune` run on CPU and on CUDA (f32) on the random model in DIR: per optimizer
# step, the loss and the global gradient norm (before clipping) must agree to 1e-4 relative.
# (The adapters themselves are not compared: AdamW divides by sqrt(v), so parameters whose
# gradients are ~0 move by ±lr on float noise alone.)
# usage: scripts/gpu-finetune-check.sh path/to/tandem DIR   (DIR: an HF model dir with tokenizer.json)
set -uo pipefail
bin="$1"; dir="$2"
python3 - "$dir/train.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for k in range(8):
        f.write(json.dumps({"text": " ".join(f"w{(k * 37 + i * 11) % 512}" for i in range(40))}) + "\n")
PY
for dev in cpu cuda; do
  "$bin" finetune --model "$dir" --device "$dev" --dtype f32 --data "$dir/train.jsonl" --out "$dir/ft-$dev" \
    --targets all-linear --rank 8 --lr 1e-2 --epochs 2 --batch-size 4 --chunk-tokens 16 --seed 1 > "$dir/ft-$dev.log" || exit 1
done
python3 - "$dir/ft-cpu.log" "$dir/ft-cuda.log" <<'PY'
import re, sys
def steps(path):
    return [tuple(float(x) for x in re.search(r"loss (\S+) .* grad_norm (\S+)", l).groups())
            for l in open(path) if l.startswith("step ")]
a, b = steps(sys.argv[1]), steps(sys.argv[2])
ok = len(a) == len(b) > 0
for i, (x, y) in enumerate(zip(a, b)):
    rel = max(abs(x[0] - y[0]) / abs(x[0]), abs(x[1] - y[1]) / abs(x[1]))
    ok &= rel <= 1e-4
    print(f"step {i + 1}: loss cpu {x[0]:.4f} cuda {y[0]:.4f}, grad_norm cpu {x[1]:.4f} cuda {y[1]:.4f}")
print(("ok  " if ok else "FAIL") + " cpu vs cuda finetuning, per-step loss and gradient norm")
sys.exit(0 if ok else 1)
PY
