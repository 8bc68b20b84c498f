"""A real Prometheus scrapes a real `tandem serve` while it co-serves (a fine-tuning job and chat
requests in the same iterations); then every PromQL expression of the Grafana dashboard
(deploy/grafana/tandem.json) runs through Prometheus's HTTP API and must return data, and the key
series must move as they should. Needs Debian's `prometheus` package (.ci/run installs it).

TANDEM_BIN names the binary (default target/debug/tandem); PROMETHEUS_BIN the Prometheus binary.
With TANDEM_SCREENSHOT=out.png and chromium installed, it also saves a screenshot of
Prometheus's graph page with the co-serving series.
"""
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse

import httpx
import openai
import pytest

from test_openai import MODEL, Q, free_port, start, upload_training_file, wait_for

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "deploy", "grafana", "tandem.json")
PROMETHEUS = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")


def dashboard_exprs():
    d = json.load(open(DASHBOARD))
    return [(p["title"], t["expr"]) for p in d["panels"] if p["type"] != "row" for t in p["targets"]]


def test_dashboard_is_grafana_importable_with_a_templated_datasource():
    d = json.load(open(DASHBOARD))
    assert d["schemaVersion"] >= 36 and d["title"] and d["uid"]
    var = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert len(var) == 1 and var[0]["query"] == "prometheus"
    ref = "${" + var[0]["name"] + "}"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        assert {"x", "y", "w", "h"} <= p["gridPos"].keys() and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat", "gauge", "bargauge", "table"}
        assert p["datasource"] == {"type": "prometheus", "uid": ref}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == ref and t["expr"] and t["refId"]


def prom_query(prom, expr, at=None):
    params = {"query": expr.replace("$__rate_interval", "1m")}
    if at is not None:
        params["time"] = at
    r = httpx.get(prom + "/api/v1/query", params=params, timeout=30).json()
    assert r["status"] == "success", (expr, r)
    return r["data"]["result"]


def scalar_sum(result):
    return sum(float(s["value"][1]) for s in result)


@pytest.fixture(scope="module")
def coserving():
    if PROMETHEUS is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed (apt-get install prometheus)")
        pytest.skip("prometheus is not installed")
    data = tempfile.mkdtemp()
    proc, url = start("--data-dir", data, "--tpot-slo-ms", "400", "--ttft-slo-ms", "3000")
    work = tempfile.mkdtemp()
    port = free_port()
    cfg = os.path.join(work, "prometheus.yml")
    target = url.removeprefix("http://")
    with open(cfg, "w") as f:
        f.write(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                f"scrape_configs:\n  - job_name: tandem\n    static_configs:\n      - targets: ['{target}']\n")
    prom_log = open(os.path.join(work, "prometheus.log"), "w")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={work}/tsdb",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=prom_log, stderr=subprocess.STDOUT)
    prom_url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(prom_url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError("prometheus did not start: " + open(prom_log.name).read())
        yield url, prom_url
    finally:
        prom.terminate()
        proc.terminate()
        prom.wait(timeout=30)
        proc.wait(timeout=30)


def test_every_dashboard_query_returns_data_while_tandem_coserves(coserving):
    url, prom = coserving
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    # Wait for the first scrapes; remember where the counters start.
    for _ in range(100):
        if prom_query(prom, "up{job='tandem'} == 1"):
            break
        time.sleep(0.2)
    time.sleep(2)
    t0 = time.time()
    tokens0 = {s["metric"]["kind"]: float(s["value"][1]) for s in prom_query(prom, "tandem:iteration_tokens_total")}
    assert scalar_sum(prom_query(prom, 'tandem:finetune_jobs{status="running"}')) == 0

    job = c.fine_tuning.jobs.create(model=MODEL, training_file=upload_training_file(c), suffix="prom",
                                    hyperparameters={"n_epochs": 2, "batch_size": 1})
    # Inference while the job trains: the iterations mix both.
    # One request in four under an output constraint (the structured-output panel), as long.
    constraint = lambda i: {"extra_body": {"guided_regex": "[a-z ]{40,60}"}} if i % 4 == 3 else {}
    chat = lambda i: c.chat.completions.create(model=MODEL, messages=Q, max_tokens=12 + i % 5, temperature=0, **constraint(i))
    with cf.ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            list(pool.map(chat, range(4)))
    saw_running = scalar_sum(prom_query(prom, 'tandem:finetune_jobs{status="running"}'))
    done = wait_for(c, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    # Requests through the fine-tuned model too (per-model series), then let Prometheus scrape.
    c.chat.completions.create(model=done.fine_tuned_model, messages=Q, max_tokens=4, temperature=0)
    c.chat.completions.create(model=MODEL, messages=Q, max_tokens=4, response_format={"type": "json_object"})
    time.sleep(3)

    # The key series moved as they should.
    tokens1 = {s["metric"]["kind"]: float(s["value"][1]) for s in prom_query(prom, "tandem:iteration_tokens_total")}
    for kind in ["decode", "prefill", "finetune_forward", "finetune_backward"]:
        assert tokens1.get(kind, 0) > tokens0.get(kind, 0), (kind, tokens0, tokens1)
    assert scalar_sum(prom_query(prom, 'tandem:finetune_jobs{status="succeeded"}')) == 1
    ran = prom_query(prom, f'max_over_time(tandem:finetune_jobs{{status="running"}}[{int(time.time() - t0) + 5}s])')
    assert max(saw_running, scalar_sum(ran)) == 1, "the job was never seen running"
    assert scalar_sum(prom_query(prom, "tandem:finetune_trained_tokens_total")) > 0
    assert scalar_sum(prom_query(prom, "tandem:coserve_mixed_iterations_total")) > 0
    per_model = {s["metric"]["model_name"] for s in prom_query(prom, "tandem:request_success_total")}
    assert {MODEL, done.fine_tuned_model} <= per_model
    pred = scalar_sum(prom_query(prom, 'tandem:iteration_time_seconds_sum{source="predicted"}'))
    meas = scalar_sum(prom_query(prom, 'tandem:iteration_time_seconds_sum{source="measured"}'))
    assert meas > 0 and 0.2 < pred / meas < 5, (pred, meas)

    # Every expression of the dashboard returns data.
    empty = [(title, expr) for title, expr in dashboard_exprs() if not prom_query(prom, expr)]
    assert not empty, f"dashboard queries with no data: {empty}"

    shot = os.environ.get("TANDEM_SCREENSHOT")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if shot and chromium:
        exprs = ['sum by (kind) (rate(tandem:iteration_tokens_total[30s]))',
                 'sum(rate(tandem:finetune_trained_tokens_total[30s]))',
                 'histogram_quantile(0.9, sum by (le) (rate(tandem:time_per_output_token_seconds_bucket[30s])))']
        q = "&".join(f"g{i}.expr={urllib.parse.quote(e)}&g{i}.tab=0&g{i}.range_input=1m" for i, e in enumerate(exprs))
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1400,2000", "--virtual-time-budget=8000", f"--screenshot={shot}",
                        f"{prom}/graph?{q}"], check=True, timeout=120)
