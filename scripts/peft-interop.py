"""tandem <-> HF transformers + PEFT, on a tiny random Llama (CPU is enough).

1. transformers writes a random LlamaForCausalLM (safetensors) and PEFT a random LoRA adapter
   (all seven projections, B non-zero) with rsLoRA and alpha_pattern overrides (a plain name and a regex).
2. Greedy tokens from HF (base, and base + adapter through PEFT) must equal `tandem generate`'s
   (base, and `--adapter`).
3. `tandem adapter check --save-to` rewrites the adapter with tandem's PEFT writer; PEFT loads
   that copy and must give the same tokens again.
4. `tandem finetune` trains an adapter on the same model; PEFT loads it and must give the same
   tokens as `tandem generate --adapter`.

usage: python3 scripts/peft-interop.py path/to/tandem [generate args...]   (needs torch, transformers, peft)
Extra arguments go to every `tandem generate`, e.g. `--device cuda --dtype f32` on a GPU host.
"""
import json, subprocess, sys, tempfile, os
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

tandem = sys.argv[1]
generate_args = sys.argv[2:]
d = tempfile.mkdtemp()
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, eos_token_id=None,
                  bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
base = LlamaForCausalLM(cfg).eval()
model_dir = os.path.join(d, "model")
base.save_pretrained(model_dir, safe_serialization=True)
vocab = {f"w{i}": i for i in range(cfg.vocab_size)}
json.dump({"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}}, open(os.path.join(model_dir, "tokenizer.json"), "w"))

prompt = [5, 17, 42, 7, 99]
N = 20

def hf_greedy(m):
    with torch.no_grad():
        out = m.generate(torch.tensor([prompt]), max_new_tokens=N, min_new_tokens=N, do_sample=False)
    return out[0, len(prompt):].tolist()

def tandem_greedy(*extra):
    out = subprocess.run([tandem, "generate", "--model", model_dir, "--no-chat", "--prompt", " ".join(f"w{i}" for i in prompt),
                          "--max-tokens", str(N), *generate_args, *extra], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"tandem failed: {out.stderr}")
    return [int(w[1:]) for w in out.stdout.split()]

results = {}
results["base"] = (hf_greedy(base), tandem_greedy())

lcfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, init_lora_weights=False, lora_dropout=0.0,
                  alpha_pattern={"down_proj": 4, r"model\.layers\.1\.self_attn\.(q|v)_proj": 64},
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir), lcfg).eval()
with torch.no_grad():  # make the adapter matter
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            p.mul_(4.0)
adapter_dir = os.path.join(d, "adapter")
peft_model.save_pretrained(adapter_dir)
results["peft adapter"] = (hf_greedy(peft_model), tandem_greedy("--adapter", adapter_dir))

copy_dir = os.path.join(d, "tandem-copy")
subprocess.run([tandem, "adapter", "check", "--model", model_dir, adapter_dir, "--save-to", copy_dir], check=True)
reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir), copy_dir).eval()
results["tandem-written adapter in PEFT"] = (hf_greedy(reloaded), tandem_greedy("--adapter", copy_dir))

# 4. An adapter trained by `tandem finetune` loads in PEFT and gives the same tokens there.
data = os.path.join(d, "train.jsonl")
with open(data, "w") as f:
    for k in range(6):
        f.write(json.dumps({"text": " ".join(f"w{(k * 13 + i * 7) % cfg.vocab_size}" for i in range(12))}) + "\n")
trained_dir = os.path.join(d, "trained")
subprocess.run([tandem, "finetune", "--model", model_dir, "--data", data, "--out", trained_dir, "--targets", "all-linear",
                "--rank", "4", "--lr", "5e-2", "--epochs", "2", "--batch-size", "3", "--chunk-tokens", "5",
                *generate_args], check=True, capture_output=True)
trained = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir), trained_dir).eval()
results["adapter trained by tandem finetune, in PEFT"] = (hf_greedy(trained), tandem_greedy("--adapter", trained_dir))

ok = True
for name, (hf, td) in results.items():
    same = hf == td
    ok &= same
    print(f"{'ok  ' if same else 'FAIL'} {name}: HF {hf}\n     {' ' * len(name)}  tandem {td}")
assert results["base"][0] != results["peft adapter"][0], "the adapter should change the tokens"
sys.exit(0 if ok else 1)
