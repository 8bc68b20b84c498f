#!/usr/bin/env python3
"""Replicas sharing one store, measured on one machine: three `tandem serve` processes on a
PostgreSQL server of their own (started here, as tests/test_replicas.py does) and one adapter
store. Prints the job-claim latency (create → a replica trains it), the failover time after
kill -9 of the trainer (kill → another replica holds the job; kill → its first optimizer step),
and `tandem bench store` on the same database (the store's cost per watcher pass, PostgreSQL
beside SQLite).

    scripts/replicas-bench.py target/release/tandem [--lease 3] [--claims 5]
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("TANDEM_BIN", sys.argv[1] if len(sys.argv) > 1 else "target/release/tandem")

import tempfile  # noqa: E402

import test_replicas as tr  # noqa: E402
from test_openai import MODEL, upload_training_file  # noqa: E402


def first(pred, timeout=600, every=0.02):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise SystemExit("timed out")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("--lease", default="3")
    ap.add_argument("--claims", type=int, default=5)
    a = ap.parse_args()
    tr.LEASE = a.lease
    pg = tr.Postgres()
    pg.start()
    store = tempfile.mkdtemp(prefix="tandem-adapters-")
    rs = [tr.Replica(f"r{i}", pg, store) for i in range(3)]
    try:
        c = rs[0].client
        fid = upload_training_file(c, tr.TEACH)
        claims = []
        for _ in range(a.claims):
            t0 = time.monotonic()
            job = c.fine_tuning.jobs.create(model=MODEL, training_file=fid, hyperparameters={"n_epochs": 1, "batch_size": 4})
            first(lambda: tr.trainer(rs, job.id))
            claims.append(time.monotonic() - t0)
            c.fine_tuning.jobs.cancel(job.id)
            first(lambda: not any(tr.trainer(rs, j.id) for j in c.fine_tuning.jobs.list(limit=20)), every=0.1)
        print(f"claim latency over {len(claims)} jobs (create → trained by a replica): "
              f"median {statistics.median(claims) * 1e3:.0f} ms, max {max(claims) * 1e3:.0f} ms")

        job = c.fine_tuning.jobs.create(model=MODEL, training_file=fid, hyperparameters={"n_epochs": 4, "batch_size": 4})
        [t] = first(lambda: tr.trainer(rs, job.id))
        first(lambda: c.fine_tuning.jobs.retrieve(job.id).model_extra.get("tandem_checkpoints"), every=0.1)
        rest = [r for r in rs if r is not t]
        seen = len(list(rest[0].client.fine_tuning.jobs.list_events(job.id, limit=100)))
        t0 = time.monotonic()
        t.proc.send_signal(signal.SIGKILL)
        t.proc.wait()
        first(lambda: tr.trainer(rest, job.id))
        held = time.monotonic() - t0

        def stepped():
            ev = list(reversed(list(rest[0].client.fine_tuning.jobs.list_events(job.id, limit=100))))[seen:]
            i = next((i for i, e in enumerate(ev) if e.message.startswith("Resumed")), None)
            return i is not None and any(e.type == "metrics" for e in ev[i:])
        first(stepped, every=0.05)
        trained = time.monotonic() - t0
        print(f"failover after kill -9 (--lease-seconds {a.lease}): another replica holds the job after "
              f"{held:.2f} s, its first optimizer step after {trained:.2f} s")
        done = tr.wait_for(rest[0].client, job.id, ("succeeded", "failed", "cancelled"), timeout=600)
        print(f"the job then {done.status}")
    finally:
        for r in rs:
            r.stop()
    out = subprocess.run([a.bin, "bench", "store", "--database-url", pg.url], capture_output=True, text=True)
    print(out.stdout + out.stderr)
    pg.stop()


if __name__ == "__main__":
    main()
