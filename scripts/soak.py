"""A soak under load, on loopback only: `tandem serve` on the default model with two adapters and
a fine-tuning job training, while many clients send streaming and non-streaming chat and
completion requests across the base model and the adapters, some disconnecting mid-stream, for a
bounded time. Then the job is cancelled and the server must be back where it started.

Checks: no 5xx; every request either succeeds, or is refused with 429 and Retry-After (past
--max-pending); streams end with [DONE] (or were dropped by the client); afterwards no request
runs, the KV cache is empty again, and the resident memory is back at its baseline (taken after a
warm-up of the same load, which touches every KV page: the cache's memory is reserved, not
touched, at start, so RSS grows with the blocks used until all have been).
Prints one JSON summary line (requests, errors, p50/p99 latency, RSS before/during/after) and
exits 1 if a check failed.

usage: python3 scripts/soak.py path/to/tandem [--secs 60] [--clients 24] [--max-pending 16] [--warmup 10]
       [--kv-cache-blocks 128] [--no-job]
"""
import argparse, json, os, random, socket, subprocess, sys, tempfile, threading, time

import httpx

ap = argparse.ArgumentParser()
ap.add_argument("tandem")
ap.add_argument("--secs", type=float, default=60)
ap.add_argument("--clients", type=int, default=24)
ap.add_argument("--max-pending", type=int, default=16)
ap.add_argument("--kv-cache-blocks", type=int, default=128,
                help="small, so that the warm-up touches every KV page before the baseline is taken")
ap.add_argument("--warmup", type=float, default=10, help="seconds of the same load before the baseline")
ap.add_argument("--no-job", action="store_true", help="inference only (to tell the job's memory from the rest)")
a = ap.parse_args()
MODEL = "SmolLM2-135M-Instruct"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def metric(url, name):
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def write_adapter(path, seed):
    import numpy as np
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = {}
    for l in range(30):
        for p, out in (("q_proj", 576), ("v_proj", 192)):
            base = f"base_model.model.model.layers.{l}.self_attn.{p}"
            t[f"{base}.lora_A.weight"] = (rng.standard_normal((8, 576)) * 0.1).astype(np.float32)
            t[f"{base}.lora_B.weight"] = (rng.standard_normal((out, 8)) * 0.01).astype(np.float32)
    save_file(t, os.path.join(path, "adapter_model.safetensors"))
    json.dump({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none"},
              open(os.path.join(path, "adapter_config.json"), "w"))


d = tempfile.mkdtemp()
write_adapter(os.path.join(d, "a1"), 1)
write_adapter(os.path.join(d, "a2"), 2)
port = free_port()
url = f"http://127.0.0.1:{port}"
log = open(os.path.join(d, "serve.log"), "w")
proc = subprocess.Popen([a.tandem, "serve", "--port", str(port), "--max-pending", str(a.max_pending),
                         "--kv-cache-blocks", str(a.kv_cache_blocks),
                         "--adapter", f"a1={d}/a1", "--adapter", f"a2={d}/a2", "--data-dir", os.path.join(d, "data")],
                        stdout=log, stderr=subprocess.STDOUT)
failures = []
try:
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    c = httpx.Client(base_url=url, timeout=120)
    lines = "\n".join(json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"},
                                               {"role": "assistant", "content": f"A{i}."}]}) for i in range(6))
    fid = c.post("/v1/files", files={"file": ("t.jsonl", lines)}, data={"purpose": "fine-tune"}).json()["id"]
    job = None if a.no_job else c.post("/v1/fine_tuning/jobs", json={
        "model": MODEL, "training_file": fid, "hyperparameters": {"n_epochs": 50, "batch_size": 2}}).json()
    stats = {"ok": 0, "429": 0, "dropped": 0, "errors": 0}
    latencies, lock, peak = [], threading.Lock(), []

    def one(rng, client):
        model = rng.choice([MODEL, "a1", "a2"])
        kind = rng.choice(["chat", "chat-stream", "drop", "completion"])
        body = {"model": model, "max_tokens": rng.randint(4, 24), "temperature": rng.choice([0, 0.8])}
        if kind == "completion":
            path, body["prompt"] = "/v1/completions", f"Once upon a time {rng.randint(0, 9)}"
        else:
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"Count to {rng.randint(2, 9)}."}]
        t0 = time.time()
        if kind == "chat" or kind == "completion":
            r = client.post(path, json=body)
            status, done = r.status_code, True
            retry = r.headers.get("retry-after")
        else:
            body["stream"] = True
            with client.stream("POST", path, json=body) as r:
                status, retry, done = r.status_code, r.headers.get("retry-after"), False
                if status == 200:
                    for line in r.iter_lines():
                        if kind == "drop" and line.startswith("data: {"):
                            break  # the client goes away mid-stream
                        if line == "data: [DONE]":
                            done = True
                else:
                    r.read()
        dt = time.time() - t0
        backoff = 0.0
        with lock:
            if status == 200 and (done or kind == "drop"):
                stats["ok" if done else "dropped"] += 1
                latencies.append(dt)
            elif status == 429 and retry:
                stats["429"] += 1
                backoff = min(float(retry), 0.5)
            else:
                stats["errors"] += 1
                failures.append(f"{kind} {model}: status {status}, done {done}, retry-after {retry}")
        time.sleep(backoff)  # as a client told to retry later would

    def worker(k, end):
        rng = random.Random(k)
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.time() < end:
                try:
                    one(rng, client)
                except httpx.HTTPError as e:
                    with lock:
                        stats["errors"] += 1
                        failures.append(f"transport error: {e!r}")

    def load(secs):
        end = time.time() + secs
        threads = [threading.Thread(target=worker, args=(k, end)) for k in range(a.clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak.append(rss_kib(proc.pid))
            time.sleep(0.5)

    # The same load first, so that the baseline has every KV page and the allocator's arenas
    # warm; then the soak itself, counted from a clean slate.
    load(a.warmup)
    for key in stats:
        stats[key] = 0
    latencies.clear()
    failures.clear()
    rss_before = rss_kib(proc.pid)
    peak.append(rss_before)
    load(a.secs)
    trained = None
    if job is not None:
        trained = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json().get("trained_tokens", 0)
        c.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    # Settle: nothing running, the KV cache empty (dropped streams freed their blocks).
    for _ in range(100):
        if metric(url, "tandem:num_requests_running") == 0 and metric(url, "tandem:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.1)
    running, kv = metric(url, "tandem:num_requests_running"), metric(url, "tandem:kv_cache_usage_perc")
    time.sleep(1)
    rss_after = rss_kib(proc.pid)
    latencies.sort()
    pct = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else None
    summary = {"secs": a.secs, "clients": a.clients, "requests": sum(stats.values()), **stats,
               "latency_p50_s": pct(0.5), "latency_p99_s": pct(0.99), "job_trained_tokens": trained,
               "rss_mib_before": round(rss_before / 1024), "rss_mib_peak": round(max(peak) / 1024),
               "rss_mib_after": round(rss_after / 1024), "running_after": running, "kv_usage_after": kv}
    print(json.dumps(summary))
    if stats["errors"]:
        failures.insert(0, f"{stats['errors']} failed requests")
    if stats["ok"] == 0:
        failures.append("no request succeeded")
    if trained is not None and trained <= 0:
        failures.append("the job trained nothing during the soak")
    if running != 0 or kv != 0:
        failures.append(f"not back to idle: running {running}, KV usage {kv}")
    # After the warm-up, the resident size must not grow (a small margin for the allocator).
    if rss_after > rss_before * 1.05 + 32 * 1024:
        failures.append(f"RSS grew: {rss_before} -> {rss_after} KiB")
finally:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        failures.append("the server did not stop on SIGTERM")
for f in failures[:20]:
    print("FAIL:", f, file=sys.stderr)
sys.exit(1 if failures else 0)
