"""Replicas as one server: three `tandem serve` processes on loopback ports sharing one real
PostgreSQL server (Debian's, started here in a temporary folder) and one adapter store, driven
through the official `openai` client. Files and jobs made on one are seen by all; a job is
trained by exactly one; its model and checkpoints answer on the others; kill -9 of the trainer
hands the job to another, which resumes it from its last checkpoint; an idle replica takes jobs
from a busy one; PostgreSQL restarted mid-run gives clear 503s and no crash. Started by .ci/run.
"""
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import httpx
import openai
import pytest

from test_openai import MODEL, free_port, metric_in, start, upload_training_file, wait_for, write_adapter

LEASE = "3"
Q = [{"role": "user", "content": "What is 2 plus 3?"}]


def pg_bin(name):
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if not found:
        pytest.skip(f"PostgreSQL's {name} is not installed")
    return found


class Postgres:
    """A PostgreSQL server of its own, in a temporary folder, on a free loopback port."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="tandem-pg-")
        self.port = free_port()
        # initdb and postgres refuse to run as root: run them as Debian's postgres user then.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        subprocess.run([*self.as_user, pg_bin("initdb"), "-D", self.dir + "/data", "-U", "tandem",
                        "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
        self.url = f"postgres://tandem@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args):
        subprocess.run([*self.as_user, pg_bin("pg_ctl"), "-D", self.dir + "/data", "-l", self.dir + "/log",
                        "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "-w", *args],
                       check=True, capture_output=True)

    def start(self):
        self.ctl("start")

    def stop(self):
        self.ctl("stop", "-m", "fast")


@pytest.fixture(scope="module")
def pg():
    p = Postgres()
    p.start()
    yield p
    try:
        p.stop()
    except subprocess.CalledProcessError:
        pass
    shutil.rmtree(p.dir, ignore_errors=True)


class Replica:
    def __init__(self, name, pg, store, *extra, env=None):
        self.name, self.pg, self.store = name, pg, store
        self.proc, self.url = start("--database-url", pg.url, "--adapter-store", store,
                                    "--data-dir", tempfile.mkdtemp(prefix=f"tandem-{name}-"),
                                    "--replica-id", name, "--lease-seconds", LEASE, *extra, env=env)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def alive(self):
        return self.proc.poll() is None

    def metrics(self):
        return httpx.get(self.url + "/metrics", timeout=10).text

    def stop(self):
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def replicas(pg):
    store = tempfile.mkdtemp(prefix="tandem-adapters-")
    rs = [Replica(f"r{i}", pg, store) for i in range(3)]
    yield rs
    for r in rs:
        r.stop()


TEACH = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                       {"role": "assistant", "content": f"BANANA! {a + b}."}]}
         for a, b in [(2, 3), (1, 1), (4, 2), (3, 3), (5, 1), (2, 2), (6, 1), (4, 4)]]


def trainer(replicas, job_id):
    """The replicas whose metrics say they train the job now."""
    return [r for r in replicas if r.alive() and metric_in(r.metrics(), "tandem:finetune_job_replica", job=job_id) == 1]


def wait_trained_by_one(replicas, job_id, timeout=120):
    for _ in range(timeout * 4):
        t = trainer(replicas, job_id)
        if t:
            return t
        time.sleep(0.25)
    raise AssertionError(f"no replica trains {job_id}")


def wait_first_checkpoint(r, job_id):
    """The job once its first checkpoint is recorded."""
    for _ in range(2400):
        j = r.client.fine_tuning.jobs.retrieve(job_id)
        if j.model_extra.get("tandem_checkpoints"):
            return j
        time.sleep(0.25)
    raise AssertionError(f"{job_id} recorded no checkpoint")


def ask(r, model):
    return r.client.chat.completions.create(model=model, messages=Q, temperature=0, max_tokens=12).choices[0].message.content


def test_files_jobs_and_models_are_shared_and_a_job_is_trained_by_one(replicas):
    a, b, c = replicas
    fid = upload_training_file(a.client, TEACH)
    for r in replicas:
        assert r.client.files.retrieve(fid).filename == "train.jsonl"
        assert fid in [f.id for f in r.client.files.list()]
    job = b.client.fine_tuning.jobs.create(model=MODEL, training_file=fid,
                                           hyperparameters={"n_epochs": 2, "batch_size": 4})
    for r in replicas:
        assert r.client.fine_tuning.jobs.retrieve(job.id).training_file == fid
    trainers = wait_trained_by_one(replicas, job.id)
    assert len(trainers) == 1, [t.name for t in trainers]
    done = wait_for(c.client, job.id, ("succeeded", "failed", "cancelled"), timeout=600)
    assert done.status == "succeeded", done.error
    t = trainers[0]
    assert done.model_extra["tandem_replica"] == t.name
    events = [e.message for e in c.client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert f"Fine-tuning job started on replica {t.name}" in events, events
    others = [r for r in replicas if r is not t]
    # The model and its checkpoints answer on replicas that did not train it, as on the trainer.
    expected = ask(t, done.fine_tuned_model)
    for r in others:
        assert done.fine_tuned_model in [m.id for m in r.client.models.list()]
        assert ask(r, done.fine_tuned_model) == expected
    ckpts = list(others[0].client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in ckpts] == [2]  # the end of epoch 1 (epoch 2 ends the job)
    name = next(c.fine_tuned_model_checkpoint for c in ckpts if c.step_number == 2)
    assert ask(others[1], name) == ask(t, name)


def test_adapters_loaded_at_run_time_are_served_by_every_replica(replicas):
    a, b, c = replicas
    d = tempfile.mkdtemp()
    load = lambda r, path: httpx.post(r.url + "/v1/load_lora_adapter", json={"lora_name": "shared-rand", "lora_path": path})
    write_adapter(os.path.join(d, "v1"), zero_b=False, seed=1)
    write_adapter(os.path.join(d, "v2"), zero_b=False, seed=2)
    assert load(a, os.path.join(d, "v1")).status_code == 200
    first = ask(a, "shared-rand")
    assert first != ask(a, MODEL)
    assert "shared-rand" in [m.id for m in b.client.models.list()]
    assert ask(b, "shared-rand") == first
    # New weights under the same name on another replica: every replica serves the new ones.
    assert load(c, os.path.join(d, "v2")).status_code == 200
    second = ask(c, "shared-rand")
    assert second != first
    assert ask(a, "shared-rand") == second and ask(b, "shared-rand") == second
    # Unloaded on one: gone from all.
    assert httpx.post(b.url + "/v1/unload_lora_adapter", json={"lora_name": "shared-rand"}).status_code == 200
    for r in replicas:
        with pytest.raises(openai.NotFoundError):
            ask(r, "shared-rand")
        assert "shared-rand" not in [m.id for m in r.client.models.list()]


def test_kill_9_of_the_trainer_hands_the_job_to_another_that_resumes_it(replicas):
    a = replicas[0]
    fid = upload_training_file(a.client, TEACH)
    job = a.client.fine_tuning.jobs.create(model=MODEL, training_file=fid,
                                           hyperparameters={"n_epochs": 4, "batch_size": 4})
    [t] = wait_trained_by_one(replicas, job.id)
    # Once its first checkpoint is recorded, the trainer dies.
    wait_first_checkpoint(a, job.id)
    t.proc.send_signal(signal.SIGKILL)
    t.proc.wait()
    rest = [r for r in replicas if r is not t]
    done = wait_for(rest[0].client, job.id, ("succeeded", "failed", "cancelled"), timeout=600)
    assert done.status == "succeeded", done.error
    assert done.model_extra["tandem_replica"] != t.name
    events = list(reversed(list(rest[1].client.fine_tuning.jobs.list_events(job.id, limit=200))))
    msgs = [e.message for e in events]
    resumed = [i for i, m in enumerate(msgs) if m.startswith("Resumed on replica")]
    assert len(resumed) == 1, msgs
    from_step = int(msgs[resumed[0]].rsplit(" ", 1)[1])
    assert from_step >= 2
    steps = [(i, e.data["step"]) for i, e in enumerate(events) if e.type == "metrics"]
    before = [s for i, s in steps if i < resumed[0]]
    after = [s for i, s in steps if i > resumed[0]]
    # Every step the dead replica recorded, in order; then the new one from its checkpoint on.
    assert before == list(range(1, len(before) + 1)) and len(before) >= from_step, steps
    assert after == list(range(from_step + 1, 9)), steps
    ckpts = [c["step_number"] for c in done.model_extra["tandem_checkpoints"]]
    assert ckpts == sorted(set(ckpts)) and ckpts[-1] == 6, ckpts
    assert rest[0].client.files.retrieve(fid).id == fid
    assert ask(rest[1], done.fine_tuned_model)
    # The dead replica comes back as a fresh process.
    replicas[replicas.index(t)] = Replica(t.name, t.pg, t.store)


def test_an_idle_replica_takes_the_jobs_of_a_busy_one(replicas):
    busy = replicas[0]
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                busy.client.chat.completions.create(model=MODEL, messages=Q, max_tokens=64)
            except openai.APIError:
                pass

    threads = [threading.Thread(target=load) for _ in range(3)]
    for th in threads:
        th.start()
    try:
        time.sleep(1)
        fid = upload_training_file(busy.client, TEACH)
        jobs = [busy.client.fine_tuning.jobs.create(model=MODEL, training_file=fid,
                                                    hyperparameters={"n_epochs": 1, "batch_size": 4}) for _ in range(2)]
        names = set()
        for j in jobs:
            [t] = wait_trained_by_one(replicas, j.id)
            names.add(t.name)
        assert busy.name not in names and len(names) == 2, names
    finally:
        stop.set()
        for th in threads:
            th.join()
    for j in jobs:
        assert wait_for(busy.client, j.id, ("succeeded", "failed", "cancelled"), timeout=600).status == "succeeded"


def step_events(r, job_id):
    """The job's events oldest first, and the (index, step) of its metrics events."""
    events = list(reversed(list(r.client.fine_tuning.jobs.list_events(job_id, limit=200))))
    return events, [(i, e.data["step"]) for i, e in enumerate(events) if e.type == "metrics"]


def test_a_paused_job_holds_no_replica_and_resumes_on_any_from_its_last_step(replicas):
    a, b, c = replicas
    fid = upload_training_file(a.client, TEACH)
    job = a.client.fine_tuning.jobs.create(model=MODEL, training_file=fid,
                                           hyperparameters={"n_epochs": 4, "batch_size": 4})
    [t] = wait_trained_by_one(replicas, job.id)
    for _ in range(2400):
        if step_events(a, job.id)[1]:
            break
        time.sleep(0.25)
    # Paused from a replica that does not train it: the trainer checkpoints its last step and
    # hands the job back to the store.
    other = next(r for r in replicas if r is not t)
    assert other.client.fine_tuning.jobs.pause(job.id).status == "paused"
    for _ in range(240):
        j = a.client.fine_tuning.jobs.retrieve(job.id)
        if j.status == "paused" and not trainer(replicas, job.id):
            break
        time.sleep(0.25)
    assert j.status == "paused" and not trainer(replicas, job.id), j.status
    events, steps = step_events(a, job.id)
    last = steps[-1][1]
    ckpts = [c["step_number"] for c in j.model_extra["tandem_checkpoints"]]
    assert ckpts[-1] == last, (ckpts, steps)
    assert "The job was paused" in [e.message for e in events]
    # Paused, nobody claims it, and it trains nowhere.
    time.sleep(3 * float(LEASE))
    assert a.client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert not trainer(replicas, job.id)
    assert step_events(a, job.id)[1] == steps
    # Resumed from a third replica: trained on, from the step where it stopped, to the end.
    third = next(r for r in replicas if r not in (t, other))
    assert third.client.fine_tuning.jobs.resume(job.id).status == "running"
    done = wait_for(c.client, job.id, ("succeeded", "failed", "cancelled"), timeout=600)
    assert done.status == "succeeded", done.error
    events, steps = step_events(b, job.id)
    msgs = [e.message for e in events]
    resumed = [m for m in msgs if m.startswith("Resumed on replica")]
    assert resumed and resumed[0].endswith(f"from step {last}"), msgs
    assert [s for _, s in steps] == list(range(1, 9)), steps


def test_postgres_restarted_mid_run_gives_503s_then_recovers(replicas, pg):
    a, b, _ = replicas
    fid = upload_training_file(a.client, TEACH)
    job = a.client.fine_tuning.jobs.create(model=MODEL, training_file=fid,
                                           hyperparameters={"n_epochs": 2, "batch_size": 4})
    wait_trained_by_one(replicas, job.id)
    pg.stop()
    try:
        r = httpx.get(b.url + "/v1/files", timeout=30)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "store_unavailable"
        with pytest.raises(openai.InternalServerError):
            b.client.fine_tuning.jobs.retrieve(job.id)
        # Inference does not need the store.
        assert ask(b, MODEL)
    finally:
        pg.start()
    assert all(r.alive() for r in replicas)
    assert b.client.files.retrieve(fid).id == fid
    done = wait_for(b.client, job.id, ("succeeded", "failed", "cancelled"), timeout=600)
    assert done.status == "succeeded", done.error


class S3:
    """moto's S3 server on a free loopback port, with one bucket."""

    def __init__(self, bucket):
        moto = shutil.which("moto_server") or os.path.join(os.path.dirname(os.sys.executable), "moto_server")
        if not os.path.exists(moto):
            pytest.skip("moto[server] is not installed")
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="moto-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(300):
            try:
                httpx.get(self.url, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        self.env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.url, "AWS_ALLOW_HTTP": "true"}
        import boto3
        self.s3 = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                               aws_access_key_id="testing", aws_secret_access_key="testing")
        self.s3.create_bucket(Bucket=bucket)
        self.bucket = bucket

    def keys(self, prefix):
        out = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for o in out.get("Contents", []))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_an_s3_adapter_store_serves_jobs_models_everywhere_and_survives_kill_9():
    """Replicas whose adapter store is an S3 bucket (moto's server) and whose data dirs are
    their own: a job's checkpoints and model are published to the bucket; after kill -9 of its
    trainer the other replica resumes it from a checkpoint it fetched from the bucket; a replica
    started afterwards serves the model, fetched from the bucket, alike."""
    try:
        import boto3  # noqa: F401
    except ImportError:
        pytest.skip("boto3 (moto[server]) is not installed")
    s3 = S3("tandem-adapters")
    store = "s3://tandem-adapters/team"
    # A database of its own: the other tests' replicas (a shared folder store) must not claim
    # these jobs.
    pg = Postgres()
    pg.start()
    rs = []
    try:
        # A bucket that does not exist: a clear error at start.
        with pytest.raises(RuntimeError, match="does not answer"):
            Replica("s3-bad", pg, "s3://no-such-bucket/x", env=s3.env)
        rs = [Replica(f"s3-r{i}", pg, store, env=s3.env) for i in range(2)]
        a = rs[0]
        fid = upload_training_file(a.client, TEACH)
        job = a.client.fine_tuning.jobs.create(model=MODEL, training_file=fid,
                                               hyperparameters={"n_epochs": 4, "batch_size": 4})
        [t] = wait_trained_by_one(rs, job.id)
        j = wait_first_checkpoint(a, job.id)
        step = j.model_extra["tandem_checkpoints"][-1]["step_number"]
        keys = s3.keys(f"team/checkpoints/{job.id}/step-{step}/")
        assert f"team/checkpoints/{job.id}/step-{step}/tandem-manifest.json" in keys, keys
        assert f"team/checkpoints/{job.id}/step-{step}/adapter_model.safetensors" in keys, keys
        t.proc.send_signal(signal.SIGKILL)
        t.proc.wait()
        [survivor] = [r for r in rs if r is not t]
        done = wait_for(survivor.client, job.id, ("succeeded", "failed", "cancelled"), timeout=600)
        assert done.status == "succeeded", done.error
        msgs = [e.message for e in survivor.client.fine_tuning.jobs.list_events(job.id, limit=200)]
        resumed = [m for m in msgs if m.startswith("Resumed on replica s3-r")]
        assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= step, "\n".join(msgs)
        keys = s3.keys(f"team/fine_tuned/{job.id}/")
        assert f"team/fine_tuned/{job.id}/tandem-manifest.json" in keys, keys
        # Old checkpoints leave the bucket as they leave the trainer's disk.
        listed = {c["step_number"] for c in done.model_extra["tandem_checkpoints"]}
        in_bucket = {int(k.split("/step-")[1].split("/")[0]) for k in s3.keys(f"team/checkpoints/{job.id}/")}
        assert in_bucket == listed, (in_bucket, listed)
        # A replica that never saw the job serves its model and checkpoints, from the bucket.
        fresh = Replica("s3-fresh", pg, store, env=s3.env)
        rs.append(fresh)
        assert done.fine_tuned_model in [m.id for m in fresh.client.models.list()]
        assert ask(fresh, done.fine_tuned_model) == ask(survivor, done.fine_tuned_model)
        name = done.model_extra["tandem_checkpoints"][-1]["fine_tuned_model_checkpoint"]
        assert ask(fresh, name) == ask(survivor, name)
        # The bucket gone: a model not fetched yet is a clear 503, and inference goes on.
        s3.stop()
        first = done.model_extra["tandem_checkpoints"][0]["fine_tuned_model_checkpoint"]
        assert first != name
        r = httpx.post(fresh.url + "/v1/chat/completions", json={"model": first, "messages": Q, "max_tokens": 4},
                       timeout=120)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "adapter_store_unavailable", r.text
        assert ask(fresh, MODEL)
        assert fresh.alive()
    finally:
        for r in rs:
            r.stop()
        s3.stop()
        pg.stop()
        shutil.rmtree(pg.dir, ignore_errors=True)
