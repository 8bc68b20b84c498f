"""HF transformers + PEFT LoRA training on CPU, the baseline beside `tandem finetune` (docs/benchmarks.md).

Trains on exactly the tokens tandem trains on (`tandem finetune --dump-tokens FILE` writes them,
with their loss masks), in file order, in padded batches as HF's Trainer runs them, with the same
hyperparameters (AdamW, linear schedule, gradient clipping at 1.0), and prints one line per step
and a summary: trained tokens/s (real tokens, padding excluded), the model FLOP/s that implies
(4·P per trained token for LoRA: forward and input gradients through the frozen weights) and peak
resident memory.

usage: python3 scripts/hf-peft-finetune.py TOKENS.jsonl [--model DIR --gguf FILE] [--targets all-linear|q_proj,v_proj]
       [--rank 8] [--alpha 16] [--lr 1e-3] [--epochs 1] [--batch-size 4] [--threads 2]
"""
import argparse, json, resource, time
import torch
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup
from peft import LoraConfig, get_peft_model

ap = argparse.ArgumentParser()
ap.add_argument("tokens")
ap.add_argument("--model", default=None, help="HF directory (or the folder of --gguf)")
ap.add_argument("--gguf", default=None, help="a GGUF file in --model, dequantized by transformers")
ap.add_argument("--targets", default="all-linear")
ap.add_argument("--rank", type=int, default=8)
ap.add_argument("--alpha", type=float, default=16)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--epochs", type=int, default=1)
ap.add_argument("--batch-size", type=int, default=4)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
if a.model is None:
    import os
    a.model, a.gguf = os.path.expanduser("~/.cache/tandem/models"), "SmolLM2-135M-Instruct.Q4_1.gguf"
kw = {"gguf_file": a.gguf} if a.gguf else {}
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, **kw)
P = sum(p.numel() for p in model.parameters())
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] if a.targets == "all-linear" \
    else a.targets.split(",")
model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=targets))
model.train()
examples = [json.loads(l) for l in open(a.tokens) if l.strip()]
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
per_epoch = (len(examples) + a.batch_size - 1) // a.batch_size
steps = per_epoch * a.epochs
sched = get_linear_schedule_with_warmup(opt, 0, steps)
trained, t0 = 0, time.perf_counter()
for step in range(steps):
    i = step % per_epoch
    part = examples[i * a.batch_size:(i + 1) * a.batch_size]
    width = max(len(e["tokens"]) for e in part)
    ids, mask, labels = [], [], []
    for e in part:
        pad = width - len(e["tokens"])
        ids.append(e["tokens"] + [0] * pad)
        mask.append([1] * len(e["tokens"]) + [0] * pad)
        labels.append([t if e["target"][j] else -100 for j, t in enumerate(e["tokens"])] + [-100] * pad)
    s0 = time.perf_counter()
    loss = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()
    n = sum(len(e["tokens"]) for e in part)
    trained += n
    print(f"step {step + 1}/{steps} loss {loss.item():.6f} grad_norm {norm.item():.6f} tokens {n} "
          f"({n / (time.perf_counter() - s0):.0f} tok/s)", flush=True)
secs = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"trainer": "hf-peft", "targets": a.targets, "rank": a.rank, "batch_size": a.batch_size,
                  "threads": a.threads, "steps": steps, "trained_tokens": trained, "secs": round(secs, 2),
                  "tokens_per_s": round(trained / secs, 1), "model_gflops": round(4 * P * trained / secs / 1e9, 1),
                  "peak_rss_mib": round(rss)}))
