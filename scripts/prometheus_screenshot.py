"""A screenshot of live co-serving graphs: starts `tandem serve` and a Prometheus scraping it
every second, runs a fine-tuning job while chat requests come in waves (quiet, busy, quiet),
then has headless Chromium save Prometheus's graph page (token mix by kind, finetuning
tokens/s, mean TPOT, iteration time predicted vs measured).

    python3 scripts/prometheus_screenshot.py docs/coserve-prometheus.png [target/release/tandem]

Needs Debian's `prometheus` and `chromium`, and Python with openai and httpx.
"""
import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
out = os.path.abspath(sys.argv[1])
if len(sys.argv) > 2:
    os.environ["TANDEM_BIN"] = sys.argv[2]
import httpx  # noqa: E402
import openai  # noqa: E402
from test_openai import MODEL, Q, free_port, start, upload_training_file  # noqa: E402

proc, url = start("--data-dir", tempfile.mkdtemp(), "--tpot-slo-ms", "300")
work = tempfile.mkdtemp()
port = free_port()
cfg = os.path.join(work, "prometheus.yml")
with open(cfg, "w") as f:
    f.write("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tandem\n"
            f"    static_configs:\n      - targets: ['{url.removeprefix('http://')}']\n")
prom = subprocess.Popen([shutil.which("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={work}/tsdb",
                         f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
prom_url = f"http://127.0.0.1:{port}"
try:
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    time.sleep(5)
    lines = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                           {"role": "assistant", "content": f"BANANA! {i} plus {i} is {2 * i}."}]} for i in range(24)]
    job = c.fine_tuning.jobs.create(model=MODEL, training_file=upload_training_file(c, lines),
                                    hyperparameters={"n_epochs": 6, "batch_size": 2})
    stop = threading.Event()

    def wave(workers, secs):
        end = time.time() + secs
        chat = lambda _: c.chat.completions.create(model=MODEL, messages=Q, max_tokens=24, temperature=0)
        with cf.ThreadPoolExecutor(workers) as pool:
            while time.time() < end and not stop.is_set():
                list(pool.map(chat, range(workers)))

    time.sleep(25)            # the job alone
    wave(2, 30)               # light inference
    wave(8, 40)               # busy: finetuning yields
    time.sleep(25)            # the job alone again
    print("job status:", c.fine_tuning.jobs.retrieve(job.id).status)
    exprs = ['sum by (kind) (rate(tandem:iteration_tokens_total[10s]))',
             'sum(rate(tandem:finetune_trained_tokens_total[10s]))',
             'sum(rate(tandem:time_per_output_token_seconds_sum[20s])) / sum(rate(tandem:time_per_output_token_seconds_count[20s]))',
             'sum by (source) (rate(tandem:iteration_time_seconds_sum[10s])) / sum by (source) (rate(tandem:iteration_time_seconds_count[10s]))']
    q = "&".join(f"g{i}.expr={urllib.parse.quote(e)}&g{i}.tab=0&g{i}.range_input=2m" for i, e in enumerate(exprs))
    subprocess.run([shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,2750", "--virtual-time-budget=10000", f"--screenshot={out}",
                    f"{prom_url}/graph?{q}"], check=True, timeout=120)
    print("wrote", out)
finally:
    prom.terminate()
    proc.terminate()
