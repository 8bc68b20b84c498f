"""Writes a random-weight Llama (transformers) with a word-level tokenizer ("w0" ... "wN" covering
its vocabulary) as an HF model directory, for GPU checks and benchmarks on hosts without network.

usage: python3 scripts/random_llama.py DIR '{"vocab_size": 512, "hidden_size": 256, ...}' [bf16]
(the JSON holds LlamaConfig's arguments; with bf16 the weights are bfloat16, else float32)
"""
import json
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

d, kw = sys.argv[1], json.loads(sys.argv[2])
bf16 = len(sys.argv) > 3 and sys.argv[3] == "bf16"
torch.manual_seed(0)
if bf16:
    torch.set_default_dtype(torch.bfloat16)
# Initialise on the GPU when there is one (an 8B model's random init takes minutes on a CPU).
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = LlamaForCausalLM(LlamaConfig(**kw))
model.save_pretrained(d, safe_serialization=True)
vocab = {f"w{i}": i for i in range(kw["vocab_size"])}
json.dump({"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}}, open(f"{d}/tokenizer.json", "w"))
