"""Plots `tandem bench coserve` output: finetuning throughput (share of finetune-only) and TPOT SLO
attainment against the inference rate, one line per mode.

usage: python3 scripts/plot_coserve.py BENCH_OUTPUT.txt OUT.png   (needs matplotlib)
"""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

rows, header = [], None
for line in open(sys.argv[1]):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if cells and cells[0] == "load":
        header = cells
    elif header and len(cells) == len(header) and cells[0] in ("light", "medium", "heavy"):
        col = dict(zip(header, cells))
        rows.append({"rate": float(col["rate req/s"]), "mode": col["mode"],
                     "attain": float(col["TPOT SLO attainment"].rstrip("%")),
                     "share": float(col["share of finetune-only"].rstrip("%"))})
title = next((l[2:].strip() for l in open(sys.argv[1]) if l.startswith("# tandem bench coserve")), "")
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
styles = ["o-", "s--", "d-.", "v--", "^:"]
for k, mode in enumerate(dict.fromkeys(r["mode"] for r in rows)):
    pts = sorted((r["rate"], r["share"], r["attain"]) for r in rows if r["mode"] == mode)
    x = [p[0] for p in pts]
    style = "^:" if mode == "InferenceOnly" else styles[k % 4]
    color = f"C{k}"
    if mode != "InferenceOnly":
        a.plot(x, [p[1] for p in pts], style, label=mode, color=color)
    b.plot(x, [p[2] for p in pts], style, label=mode, color=color)
a.set(xlabel="inference rate (requests/s)", ylabel="finetuning throughput (% of finetune-only)", ylim=(0, 105))
b.set(xlabel="inference rate (requests/s)", ylabel="TPOT SLO attainment (%)", ylim=(-5, 105))
for ax in (a, b):
    ax.grid(alpha=0.3)
    ax.legend()
fig.suptitle(title[:110] + ("…" if len(title) > 110 else ""), fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
print("wrote", sys.argv[2])
