"""Times a fine-tuning job with every hyperparameter left out, created with the official openai
client on an idle `tandem serve` (docs/benchmarks.md): wall time from create to succeeded and
trained tokens per second.

usage: python3 scripts/job-time.py TANDEM_BIN TRAIN.jsonl
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
os.environ["TANDEM_BIN"] = sys.argv[1]
import test_openai as t
t.BIN = sys.argv[1]
import openai
proc, url = t.start(runtime_lora=False)
try:
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    f = c.files.create(file=open(sys.argv[2], "rb"), purpose="fine-tune")
    t0 = time.time()
    job = c.fine_tuning.jobs.create(model=t.MODEL, training_file=f.id)
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.2)
        job = c.fine_tuning.jobs.retrieve(job.id)
    secs = time.time() - t0
    print(sys.argv[1], job.status, f"{secs:.1f} s", "trained_tokens", job.trained_tokens,
          f"{(job.trained_tokens or 0) / secs:.0f} tok/s", "hp", job.hyperparameters)
finally:
    proc.terminate()
    proc.wait(timeout=30)
