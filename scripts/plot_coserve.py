"""Plots `tandem bench coserve` output: finetuning throughput (share of finetune-only) and TPOT SLO
attainment against the inference rate, one line per mode.

usage: python3 scripts/plot_coserve.py BENCH_OUTPUT.txt OUT.png   (needs matplotlib)
"""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

rows = []
for line in open(sys.argv[1]):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 9 and cells[0] in ("light", "medium", "heavy"):
        rows.append({"rate": float(cells[1]), "mode": cells[2], "attain": float(cells[6].rstrip("%")),
                     "ft": float(cells[7]), "share": float(cells[8].rstrip("%"))})
title = next((l[2:].strip() for l in open(sys.argv[1]) if l.startswith("# tandem bench coserve")), "")
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
for mode, style in (("Coserve", "o-"), ("Temporal", "s--"), ("InferenceOnly", "^:")):
    pts = sorted((r["rate"], r["share"], r["attain"]) for r in rows if r["mode"] == mode)
    if not pts:
        continue
    x = [p[0] for p in pts]
    if mode != "InferenceOnly":
        a.plot(x, [p[1] for p in pts], style, label=mode)
    b.plot(x, [p[2] for p in pts], style, label=mode)
a.set(xlabel="inference rate (requests/s)", ylabel="finetuning throughput (% of finetune-only)", ylim=(0, 105))
b.set(xlabel="inference rate (requests/s)", ylabel="TPOT SLO attainment (%)", ylim=(-5, 105))
for ax in (a, b):
    ax.grid(alpha=0.3)
    ax.legend()
fig.suptitle(title[:110] + ("…" if len(title) > 110 else ""), fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
print("wrote", sys.argv[2])
