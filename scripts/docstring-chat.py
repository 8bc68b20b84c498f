"""A chat fine-tuning set made from text tandem's authors did not write: CPython's own docstrings.

One line per public function of a few standard modules: the user asks what the function does,
the assistant answers with its docstring (whitespace joined, at most --max-chars). Answers run
from a dozen to a couple of hundred tokens, so batches mix lengths as real chat data does (docs/benchmarks.md uses it
beside the short "BANANA!" set for `tandem finetune` vs HF PEFT).

usage: python3 scripts/docstring-chat.py OUT.jsonl [--limit 64] [--max-chars 600]
"""
import argparse, inspect, json, importlib

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--limit", type=int, default=64)
ap.add_argument("--max-chars", type=int, default=600)
a = ap.parse_args()
rows = []
for mod in ["os.path", "json", "textwrap", "statistics", "shutil", "string", "random", "bisect", "heapq", "fnmatch"]:
    m = importlib.import_module(mod)
    for name in sorted(dir(m)):
        f = getattr(m, name)
        if name.startswith("_") or not callable(f) or inspect.isclass(f):
            continue
        doc = inspect.getdoc(f)
        if not doc:
            continue
        para = " ".join(doc.split())[: a.max_chars]
        if len(para) < 40:
            continue
        rows.append({"messages": [
            {"role": "user", "content": f"What does Python's {mod}.{name} do?"},
            {"role": "assistant", "content": para},
        ]})
with open(a.out, "w") as out:
    for r in rows[: a.limit]:
        out.write(json.dumps(r) + "\n")
print(f"{min(len(rows), a.limit)} examples written to {a.out}")
