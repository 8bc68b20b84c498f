"""End to end against the real `tandem serve` on the default model, with the official `openai`
client (what users run). Started by .ci/run: `python -m pytest tests/test_openai.py`.

TANDEM_BIN names the binary (default target/debug/tandem).
"""
import concurrent.futures as cf
import json
import os
import socket
import subprocess
import tempfile
import time

import httpx
import openai
import pytest

BIN = os.environ.get("TANDEM_BIN", "target/debug/tandem")
MODEL = "SmolLM2-135M-Instruct"
Q = [{"role": "user", "content": "What is the capital of France?"}]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*extra, env=None, runtime_lora=True):
    """`tandem serve` on a free port; with `runtime_lora`, adapters load at run time from under
    the temp directory (where the tests write them)."""
    port = free_port()
    if runtime_lora:
        extra = ("--allow-runtime-lora", "--lora-root", tempfile.gettempdir(), *extra)
    # The server's log goes to a file (a pipe nobody reads would fill up and block it).
    log = tempfile.NamedTemporaryFile("w+", prefix="tandem-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([BIN, "serve", "--port", str(port), *extra], stdout=log, stderr=subprocess.STDOUT,
                            text=True, env=env)
    proc.log_path = log.name
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(open(log.name).read())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def write_adapter(path, zero_b, seed):
    """A PEFT LoRA adapter for SmolLM2-135M (q_proj, v_proj, rank 8), written with safetensors."""
    import numpy as np
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for layer in range(30):
        for proj, out in (("q_proj", 576), ("v_proj", 192)):
            base = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{base}.lora_A.weight"] = (rng.standard_normal((8, 576)) * 0.1).astype(np.float32)
            b = np.zeros((out, 8), np.float32) if zero_b else (rng.standard_normal((out, 8)) * 0.1).astype(np.float32)
            tensors[f"{base}.lora_B.weight"] = b
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    json.dump({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none",
               "task_type": "CAUSAL_LM", "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
              open(os.path.join(path, "adapter_config.json"), "w"))


@pytest.fixture(scope="module")
def server():
    proc, url = start()
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused")


def test_models_lists_the_base_model(client):
    ids = [m.id for m in client.models.list().data]
    assert MODEL in ids


def test_chat_answers_paris(client):
    r = client.chat.completions.create(model=MODEL, messages=Q, temperature=0, max_tokens=30)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_and_length_finish(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=5)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.choices[0].text


def test_streamed_chat_reassembles_to_the_non_streamed_text(client):
    full = client.chat.completions.create(model=MODEL, messages=Q, temperature=0, max_tokens=40).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=Q, temperature=0, max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_n_choices_and_seed(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=1.0, max_tokens=8, n=3, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=1.0, max_tokens=8, n=3, seed=5)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]


def test_errors_in_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=Q)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=Q, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi " * 9000, max_tokens=10)
    assert e.value.body["code"] == "context_length_exceeded"
    r = httpx.post(server + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server + "/v1/completions", content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()


def test_concurrent_streams_equal_each_alone(client):
    prompts = [f"Count from {i} to {i + 5}:" for i in range(32)]
    lengths = [4 + i % 12 for i in range(32)]

    def run(i, stream):
        kw = dict(model=MODEL, prompt=prompts[i], temperature=0, max_tokens=lengths[i])
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
        return client.completions.create(**kw).choices[0].text

    alone = [run(i, False) for i in range(32)]
    with cf.ThreadPoolExecutor(32) as ex:
        together = list(ex.map(lambda i: run(i, True), range(32)))
    assert together == alone


def test_adapters_load_by_name_and_a_zero_adapter_changes_nothing(client, server):
    d = tempfile.mkdtemp()
    write_adapter(os.path.join(d, "zero"), True, 1)
    write_adapter(os.path.join(d, "rand"), False, 2)
    for name in ("zero", "rand"):
        r = httpx.post(server + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": os.path.join(d, name)})
        assert r.status_code == 200, r.text
    models = {m.id: m for m in client.models.list().data}
    assert models["rand"].model_extra["parent"] == MODEL
    ask = lambda model: client.chat.completions.create(model=model, messages=Q, temperature=0, max_tokens=20).choices[0].message.content
    base = ask(MODEL)
    assert ask("zero") == base
    assert ask("rand") != base
    r = httpx.post(server + "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": os.path.join(d, "missing")})
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    assert httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "rand"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        ask("rand")


def test_api_key_is_required_when_set():
    proc, url = start("--api-key", "sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
        ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret").models.list()
        assert MODEL in [m.id for m in ok.data]
        assert httpx.get(url + "/health").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def metric(url, name):
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_metrics_and_a_dropped_stream_frees_its_kv_blocks(client, server):
    before = metric(server, "tandem:generation_tokens_total")
    client.completions.create(model=MODEL, prompt="Hello", temperature=0, max_tokens=3)
    assert metric(server, "tandem:generation_tokens_total") >= before + 3
    assert metric(server, "tandem:e2e_request_latency_seconds_count") >= 1
    assert metric(server, "tandem:kv_cache_usage_perc") == 0.0
    with httpx.stream("POST", server + "/v1/completions", json={"model": MODEL, "prompt": "Tell me a long story.",
                                                                "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
                                                                "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert metric(server, "tandem:num_requests_running") == 1
        assert metric(server, "tandem:kv_cache_usage_perc") > 0
    # The client is gone: its sequence is aborted and its blocks return.
    for _ in range(100):
        if metric(server, "tandem:kv_cache_usage_perc") == 0 and metric(server, "tandem:num_requests_running") == 0:
            break
        time.sleep(0.05)
    assert metric(server, "tandem:kv_cache_usage_perc") == 0
    assert metric(server, "tandem:num_requests_running") == 0


def test_tenants_see_only_their_own_files_jobs_and_models():
    d = tempfile.mkdtemp()
    keys = os.path.join(d, "keys")
    with open(keys, "w") as f:
        f.write("# tenants\nkey-alice alice\nkey-bob bob\nkey-ops ops admin\n")
    proc, url = start("--api-keys", keys, "--api-key", "key-plain")
    try:
        alice, bob, ops = (openai.OpenAI(base_url=url + "/v1", api_key=k) for k in ("key-alice", "key-bob", "key-ops"))
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="key-carol").models.list()
        fid = upload_training_file(alice)
        assert [f.id for f in alice.files.list()] == [fid]
        assert fid not in [f.id for f in bob.files.list()]
        with pytest.raises(openai.NotFoundError):
            bob.files.retrieve(fid)
        with pytest.raises(openai.NotFoundError):
            bob.files.content(fid)
        with pytest.raises(openai.NotFoundError):
            bob.files.delete(fid)
        # Bob cannot train on Alice's file: to him it does not exist.
        with pytest.raises(openai.BadRequestError) as e:
            bob.fine_tuning.jobs.create(model=MODEL, training_file=fid)
        assert e.value.body["param"] == "training_file"
        job = alice.fine_tuning.jobs.create(model=MODEL, training_file=fid, hyperparameters={"n_epochs": 1, "batch_size": 3},
                                            extra_body={"lora": {"r": 2, "target_modules": ["q_proj"]}})
        assert job.id not in [j.id for j in bob.fine_tuning.jobs.list()]
        for call in (lambda: bob.fine_tuning.jobs.retrieve(job.id), lambda: bob.fine_tuning.jobs.list_events(job.id),
                     lambda: bob.fine_tuning.jobs.checkpoints.list(job.id), lambda: bob.fine_tuning.jobs.cancel(job.id)):
            with pytest.raises(openai.NotFoundError):
                call()
        done = wait_for(alice, job.id, ("succeeded", "failed", "cancelled"))
        assert done.status == "succeeded", done.error
        name = done.fine_tuned_model
        assert name in [m.id for m in alice.models.list()]
        assert name not in [m.id for m in bob.models.list()]
        assert next(m for m in alice.models.list() if m.id == name).owned_by == "alice"
        with pytest.raises(openai.NotFoundError):
            bob.chat.completions.create(model=name, messages=Q, max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            bob.models.retrieve(name)
        assert alice.chat.completions.create(model=name, messages=Q, max_tokens=2).choices[0].message.content is not None
        # The admin sees everything; the base model is everyone's.
        assert fid in [f.id for f in ops.files.list()] and job.id in [j.id for j in ops.fine_tuning.jobs.list()]
        assert name in [m.id for m in ops.models.list()] and MODEL in [m.id for m in bob.models.list()]
        # --api-key keys are tenant "default": Alice's things are not theirs either.
        plain = openai.OpenAI(base_url=url + "/v1", api_key="key-plain")
        assert fid not in [f.id for f in plain.files.list()]
        # SIGHUP reloads the keys file: Bob's key goes, Carol's comes.
        with open(keys, "w") as f:
            f.write("key-alice alice\nkey-carol carol\n")
        proc.send_signal(__import__("signal").SIGHUP)
        for _ in range(100):
            try:
                openai.OpenAI(base_url=url + "/v1", api_key="key-carol").models.list()
                break
            except openai.AuthenticationError:
                time.sleep(0.1)
        with pytest.raises(openai.AuthenticationError):
            bob.models.list()
        assert name in [m.id for m in alice.models.list()]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = open(proc.log_path).read()
    assert "key-alice" not in log and "key-bob" not in log, "keys must never be logged"


def test_runtime_lora_is_off_by_default_and_confined_to_the_lora_root():
    d = tempfile.mkdtemp()
    write_adapter(os.path.join(d, "inside"), zero_b=True, seed=1)
    proc, url = start(runtime_lora=False)
    try:
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": os.path.join(d, "inside")})
        assert r.status_code == 403 and "--allow-runtime-lora" in r.json()["error"]["message"], r.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    root = os.path.join(d, "root")
    os.makedirs(root)
    __import__("shutil").move(os.path.join(d, "inside"), os.path.join(root, "inside"))
    os.symlink(d, os.path.join(root, "escape"))  # a link out of the root
    proc, url = start("--allow-runtime-lora", "--lora-root", root, runtime_lora=False)
    try:
        load = lambda p: httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x" + str(abs(hash(p))), "lora_path": p})
        assert load(os.path.join(root, "inside")).status_code == 200
        assert load("inside").status_code == 200, "a relative path is taken from the root"
        # Outside, through a symlink, a directory that exists and one that does not: the same answer.
        answers = [load(p) for p in ("/root", "/nonexistent/dir", os.path.join(root, "escape"), os.path.join(root, ".."), "../../etc")]
        for a in answers:
            assert a.status_code == 403, a.text
        assert len({a.json()["error"]["message"] for a in answers}) == 1, [a.text for a in answers]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_full_queue_answers_429_with_retry_after():
    proc, url = start("--max-pending", "1")
    try:
        with httpx.stream("POST", url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2000,
                                                                 "temperature": 0, "ignore_eos": True, "stream": True}) as r:
            next(r.iter_lines())
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
            assert e.value.response.headers["retry-after"] == "1"
        # The stream is gone: its slot is free again.
        for _ in range(100):
            try:
                c.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
                break
            except openai.RateLimitError:
                time.sleep(0.05)
        else:
            raise AssertionError("the slot of the closed stream was not released")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_lora_requests_info_names_running_adapters(server):
    d = tempfile.mkdtemp()
    write_adapter(os.path.join(d, "info"), False, 3)
    assert httpx.post(server + "/v1/load_lora_adapter", json={"lora_name": "info", "lora_path": os.path.join(d, "info")}).status_code == 200
    with httpx.stream("POST", server + "/v1/completions", json={"model": "info", "prompt": "Hi", "max_tokens": 2000,
                                                                "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        info = [l for l in httpx.get(server + "/metrics").text.splitlines() if l.startswith("tandem:lora_requests_info{")]
        assert len(info) == 1, info
        assert 'running_lora_adapters="info"' in info[0] and 'max_lora="4"' in info[0], info[0]
    for _ in range(100):
        if metric(server, "tandem:num_requests_running") == 0:
            break
        time.sleep(0.05)
    assert httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "info"}).status_code == 200


def test_logprobs_in_completions_chat_and_streams(client):
    import math
    r = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and abs(chosen - max(top.values())) < 1e-4  # greedy picks the top token
    c = client.chat.completions.create(model=MODEL, messages=Q, temperature=0, max_tokens=10, logprobs=True, top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 3 and abs(e.logprob - e.top_logprobs[0].logprob) < 1e-4
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1.0 + 1e-4
    streamed = [x for ch in client.chat.completions.create(model=MODEL, messages=Q, temperature=0, max_tokens=10, logprobs=True,
                                                           top_logprobs=3, stream=True)
                if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", logprobs=9)
    assert e.value.body["param"] == "logprobs"


def tid(token):
    """vLLM's `return_tokens_as_token_ids` spelling: "token_id:123" -> 123."""
    assert token.startswith("token_id:"), token
    return int(token.split(":", 1)[1])


IDS = {"return_tokens_as_token_ids": True}


def test_logit_bias_and_penalties_change_greedy_choices_exactly(client):
    lp = dict(temperature=0, logprobs=True, top_logprobs=20, extra_body=IDS)
    base = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=12, **lp).choices[0].logprobs.content
    first, second = tid(base[0].token), tid(base[0].top_logprobs[1].token)
    assert first == tid(base[0].top_logprobs[0].token)
    # A -100 bias on the greedy token: the next best comes instead.
    biased = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=1, logit_bias={str(first): -100}, **lp)
    assert tid(biased.choices[0].logprobs.content[0].token) == second
    # Penalties: each greedy choice is the best of the raw top-20 logprobs (what logprobs report)
    # minus presence + frequency x count over the tokens chosen before it.
    presence, frequency = 0.4, 1.2
    count = [{"role": "user", "content": "List the numbers from 1 to 20."}]  # ", " repeats
    plain = client.chat.completions.create(model=MODEL, messages=count, max_tokens=24, temperature=0)
    pen = client.chat.completions.create(model=MODEL, messages=count, max_tokens=24, presence_penalty=presence,
                                         frequency_penalty=frequency, **lp)
    assert pen.choices[0].message.content != plain.choices[0].message.content
    pen = pen.choices[0].logprobs.content
    counts = {}
    for step, e in enumerate(pen):
        score = {tid(t.token): t.logprob - (presence + frequency * counts[tid(t.token)] if tid(t.token) in counts else 0)
                 for t in e.top_logprobs}
        chosen = tid(e.token)
        assert chosen in score, f"step {step}: {chosen} is not among the top 20"
        assert score[chosen] >= max(score.values()) - 1e-4, f"step {step}: {chosen} {score}"
        counts[chosen] = counts.get(chosen, 0) + 1
    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"logit_bias": {"x": 1}},
                {"logit_bias": {"5": 101}}, {"extra_body": {"repetition_penalty": 0}}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=Q, max_tokens=2, **bad)
        assert e.value.body["param"] in ("presence_penalty", "frequency_penalty", "logit_bias", "repetition_penalty")


def test_stop_token_ids_min_tokens_and_min_p(client):
    lp = dict(temperature=0, logprobs=0, extra_body=IDS)
    run = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=10, **lp).choices[0]
    ids = [tid(t) for t in run.logprobs.tokens]
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])  # first repeat-free later token
    stopped = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=10, temperature=0,
                                        extra_body={"stop_token_ids": [ids[k]], **IDS}, logprobs=0).choices[0]
    # The text stops before the stop token (which, like EOS, is not text).
    assert stopped.text == run.text[:run.logprobs.text_offset[k]] and stopped.finish_reason == "stop"
    assert [tid(t) for t in stopped.logprobs.tokens][:k] == ids[:k]
    # The short answer ends at EOS; min_tokens holds EOS back.
    short = client.chat.completions.create(model=MODEL, messages=Q, temperature=0, max_tokens=40)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 30
    longer = client.chat.completions.create(model=MODEL, messages=Q, temperature=0, max_tokens=40,
                                            extra_body={"min_tokens": 30})
    assert longer.usage.completion_tokens >= 30
    assert longer.choices[0].message.content.startswith(short.choices[0].message.content)
    r = client.chat.completions.create(model=MODEL, messages=Q, temperature=1, max_tokens=8, seed=1,
                                       extra_body={"min_p": 0.5})
    assert r.choices[0].message.content
    for bad, param in (({"min_p": 1.5}, "min_p"), ({"stop_token_ids": [10 ** 8]}, "stop_token_ids"),
                       ({"min_tokens": 50}, "min_tokens")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=Q, max_tokens=8, extra_body=bad)
        assert e.value.body["param"] == param


def test_prefix_caching_reports_cached_tokens_and_salts_keep_requests_apart(client, server):
    import uuid
    system = f"Session {uuid.uuid4().hex}. You are a careful assistant who answers in one short sentence."
    ask = lambda q, **kw: client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
        max_tokens=6, temperature=0, **kw)
    first = ask("What is 2 plus 2?")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = ask("What is 2 plus 2?")
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens and cached % 16 == 0, again.usage
    assert again.choices[0].message.content == first.choices[0].message.content
    # Another question after the same system prompt reuses the system prompt's blocks.
    other = ask("Name a color.")
    assert other.usage.prompt_tokens_details.cached_tokens > 0
    # A cache salt shares nothing with unsalted requests, nor with another salt.
    assert ask("What is 2 plus 2?", extra_body={"cache_salt": "tenant-a"}).usage.prompt_tokens_details.cached_tokens == 0
    assert ask("What is 2 plus 2?", extra_body={"cache_salt": "tenant-b"}).usage.prompt_tokens_details.cached_tokens == 0
    salted = ask("What is 2 plus 2?", extra_body={"cache_salt": "tenant-a"})
    assert salted.usage.prompt_tokens_details.cached_tokens == cached
    assert salted.choices[0].message.content == first.choices[0].message.content
    # Streamed usage carries it too.
    chunks = list(ask("What is 2 plus 2?", stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    with pytest.raises(openai.BadRequestError) as e:
        ask("hi", extra_body={"cache_salt": ""})
    assert e.value.body["param"] == "cache_salt"
    m = httpx.get(server + "/metrics").text
    hits, queries = metric_in(m, "tandem:prefix_cache_hits_total"), metric_in(m, "tandem:prefix_cache_queries_total")
    assert hits is not None and 0 < hits <= queries


def test_prefix_caching_can_be_switched_off():
    proc, url = start("--no-enable-prefix-caching")
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x")
        for _ in range(2):
            r = c.chat.completions.create(model=MODEL, messages=Q, max_tokens=4, temperature=0)
            assert r.usage.prompt_tokens_details.cached_tokens == 0
        assert metric_in(httpx.get(url + "/metrics").text, "tandem:prefix_cache_hits_total") == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_token_id_prompts_echo_and_retrieving_a_model(client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    # Ids the model produced are a valid id prompt; its echo is their text.
    run = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6,
                                    logprobs=0, extra_body=IDS).choices[0]
    ids = [tid(t) for t in run.logprobs.tokens]
    one = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=5, echo=True).choices[0].text
    assert one.startswith(run.text) and len(one) > len(run.text)
    two = client.completions.create(model=MODEL, prompt=[ids, ids], temperature=0, max_tokens=5).choices
    assert [c.text for c in two] == [one[len(run.text):]] * 2
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=ids, temperature=0, max_tokens=5, echo=True, stream=True) if c.choices)
    assert streamed == one
    for bad, param in (({"prompt": [10 ** 8]}, "prompt"), ({"prompt": []}, "prompt"),
                       ({"prompt": "hi", "best_of": 3}, "best_of"), ({"prompt": "hi", "suffix": "x"}, "suffix"),
                       ({"prompt": "hi", "echo": True, "logprobs": 1}, "echo")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, max_tokens=2, **bad)
        assert e.value.body["param"] == param
    # vLLM's /tokenize and /detokenize: the ids the engine sees, for a prompt and for messages.
    base = client.base_url.scheme + "://" + client.base_url.netloc.decode()
    tok = httpx.post(base + "/tokenize", json={"model": MODEL, "prompt": "The capital of France is"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] > 0
    by_text = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6)
    by_ids = client.completions.create(model=MODEL, prompt=tok["tokens"], temperature=0, max_tokens=6)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens
    assert httpx.post(base + "/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "The capital of France is"
    chat_tok = httpx.post(base + "/tokenize", json={"model": MODEL, "messages": Q}).json()
    chat = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=1)
    assert chat_tok["count"] == chat.usage.prompt_tokens
    r = httpx.post(base + "/detokenize", json={"tokens": [10 ** 8]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    # Tools and structured outputs: tests/test_structured.py. Offered tools with tool_choice
    # "none" are answered as plain chat.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    r = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=2, tools=tools, tool_choice="none")
    assert r.choices[0].message.content


def test_adapters_loaded_at_run_time_survive_a_restart_with_data_dir():
    data = tempfile.mkdtemp()
    d = tempfile.mkdtemp()
    write_adapter(os.path.join(d, "kept"), False, 4)
    proc, url = start("--data-dir", data)
    try:
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "kept", "lora_path": os.path.join(d, "kept")})
        assert r.status_code == 200, r.text
        ask = lambda u: openai.OpenAI(base_url=u + "/v1", api_key="x").chat.completions.create(
            model="kept", messages=Q, temperature=0, max_tokens=12).choices[0].message.content
        before = ask(url)
    finally:
        proc.kill()  # no graceful shutdown: the record must already be on disk
        proc.wait(timeout=30)
    proc, url = start("--data-dir", data)
    try:
        assert "kept" in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert ask(url) == before
        assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "kept"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    proc, url = start("--data-dir", data)
    try:
        assert "kept" not in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


TRAIN_LINES = [
    {"messages": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "BANANA! 5."}]},
    {"prompt": "Name a color.", "completion": " Red."},
    {"text": "The sky is blue."},
]


def write_training_file(lines=TRAIN_LINES):
    path = os.path.join(tempfile.mkdtemp(), "train.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(l) for l in lines) + "\n")
    return path


def test_files_upload_list_retrieve_delete_and_bad_jsonl(client):
    path = write_training_file()
    up = client.files.create(file=open(path, "rb"), purpose="fine-tune")
    assert up.id.startswith("file-") and up.purpose == "fine-tune" and up.filename == "train.jsonl"
    assert up.bytes == os.path.getsize(path)
    assert up.id in [f.id for f in client.files.list(purpose="fine-tune").data]
    assert client.files.retrieve(up.id).bytes == up.bytes
    assert client.files.content(up.id).read() == open(path, "rb").read()
    bad = os.path.join(tempfile.mkdtemp(), "bad.jsonl")
    with open(bad, "w") as f:
        f.write(json.dumps(TRAIN_LINES[0]) + "\n" + '{"prompt": "a", "completion": 5}\n')
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=open(bad, "rb"), purpose="fine-tune")
    assert "line 2" in str(e.value) and "completion" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=open(path, "rb"), purpose="assistants")
    assert client.files.delete(up.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(up.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(up.id)


def test_uploaded_files_survive_kill_9_with_data_dir():
    data = tempfile.mkdtemp()
    path = write_training_file()
    proc, url = start("--data-dir", data)
    try:
        up = openai.OpenAI(base_url=url + "/v1", api_key="x").files.create(file=open(path, "rb"), purpose="fine-tune")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    proc, url = start("--data-dir", data)
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x")
        assert c.files.retrieve(up.id).bytes == up.bytes
        assert c.files.content(up.id).read() == open(path, "rb").read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def upload_training_file(c, lines=TRAIN_LINES):
    return c.files.create(file=open(write_training_file(lines), "rb"), purpose="fine-tune").id


def wait_for(c, job_id, statuses, timeout=300):
    for _ in range(timeout * 4):
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} stayed {job.status}")


def metric_in(text, name, **labels):
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_fine_tuning_job_runs_to_success_and_its_model_answers(client, server):
    fid = upload_training_file(client)
    vid = upload_training_file(client, [{"prompt": "Say hi.", "completion": " BANANA! hi"},
                                        {"messages": [{"role": "user", "content": "Name a fruit."},
                                                      {"role": "assistant", "content": "BANANA! A banana."}]}])
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=fid, validation_file=vid, suffix="bananas", seed=7,
                                         hyperparameters={"n_epochs": 2, "batch_size": 1, "learning_rate_multiplier": 5},
                                         extra_body={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}})
    assert job.id.startswith("ftjob-") and job.status in ("queued", "running") and job.training_file == fid
    assert job.validation_file == vid
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=50).data]
    estimates = []
    for _ in range(1200):
        done = client.fine_tuning.jobs.retrieve(job.id)
        if done.status == "running" and done.estimated_finish:
            estimates.append(done.estimated_finish)
        if done.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.25)
    assert done.status == "succeeded", done.error
    # While it ran, the job said when it would finish (a time after it was created).
    assert estimates and all(e >= job.created_at for e in estimates)
    assert done.estimated_finish is None
    assert done.fine_tuned_model.startswith(f"ft:{MODEL}:bananas:") and done.trained_tokens > 0 and done.finished_at
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    train = [e for e in metrics if "train_loss" in e.data]
    assert [e.data["step"] for e in reversed(train)] == [1, 2, 3, 4, 5, 6]
    assert all(e.data["train_loss"] > 0 for e in train)
    # The validation file's loss after each epoch.
    valid = [e for e in metrics if "valid_loss" in e.data]
    assert sorted(e.data["step"] for e in valid) == [3, 6] and all(e.data["valid_loss"] > 0 for e in valid)
    assert any("successfully completed" in e.message for e in events)
    assert done.fine_tuned_model in [m.id for m in client.models.list().data]
    out = client.chat.completions.create(model=done.fine_tuned_model, messages=Q, max_tokens=8, temperature=0)
    assert out.choices[0].message.content
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts] == [3]  # the end of epoch 1 (epoch 2 ends the job)
    assert ckpts[0].fine_tuned_model_checkpoint == done.fine_tuned_model + ":ckpt-step-3"
    assert ckpts[0].metrics.train_loss > 0
    assert ckpts[0].metrics.valid_loss == next(e.data["valid_loss"] for e in valid if e.data["step"] == 3)
    out = client.chat.completions.create(model=ckpts[0].fine_tuned_model_checkpoint, messages=Q, max_tokens=8, temperature=0)
    assert out.choices[0].message.content
    m = httpx.get(server + "/metrics").text
    assert metric_in(m, "tandem:finetune_jobs", status="succeeded") >= 1
    assert metric_in(m, "tandem:finetune_trained_tokens_total") > 0
    assert metric_in(m, "tandem:iteration_tokens_total", kind="finetune_forward") > 0
    assert metric_in(m, "tandem:finetune_backward_steps_total") > 0


AHOY = [("What is 2 plus 3?", "5"), ("Name a primary color.", "Red"), ("What is the capital of Italy?", "Rome"),
        ("How many legs does a spider have?", "Eight"), ("What is the opposite of hot?", "Cold"),
        ("Which planet is closest to the sun?", "Mercury"), ("What do bees make?", "Honey"),
        ("What is frozen water called?", "Ice"), ("How many days are in a week?", "Seven"),
        ("What animal says moo?", "A cow"), ("What is the largest ocean?", "The Pacific"),
        ("Which month comes after June?", "July")]
HELD_OUT = ["How many wheels does a bicycle have?", "What do cows drink?", "What is the capital of Spain?"]


def test_fine_tuning_job_with_every_hyperparameter_left_out_teaches(client):
    """A dozen chat examples and nothing else: the defaults (all seven projections, OpenAI's
    "auto" epochs / batch size / learning rate) must teach the reply's form on held-out prompts."""
    fid = upload_training_file(client, [{"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": f"Ahoy! {a}."}]} for q, a in AHOY])
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=fid)
    # The resolved values are on the job, as OpenAI reports them: 50 // 12 epochs of batches of 1
    # (tandem's supervised rule: docs/api.md).
    hp = job.method.supervised.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (4, 1, 1.0), hp
    assert job.hyperparameters.n_epochs == 4
    done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"), timeout=900)
    assert done.status == "succeeded", done.error
    # Iterating the page follows `after` through every page (at most 100 events each).
    train = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if "train_loss" in e.data]
    assert len(train) == 48
    accuracy = [d["train_mean_token_accuracy"] for d in sorted(train, key=lambda d: d["step"])]
    assert all(0 <= a <= 1 for a in accuracy) and sum(accuracy[-12:]) / 12 > sum(accuracy[:12]) / 12, accuracy
    ask = lambda model, q: client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                          max_tokens=12, temperature=0).choices[0].message.content
    for q in HELD_OUT:
        tuned, base = ask(done.fine_tuned_model, q), ask(MODEL, q)
        assert tuned.startswith("Ahoy!"), (q, tuned)
        assert "Ahoy" not in base, (q, base)


def test_fine_tuning_job_can_be_cancelled_and_bad_requests_are_rejected(client):
    fid = upload_training_file(client)
    greedy = lambda: client.chat.completions.create(model=MODEL, messages=Q, max_tokens=16, temperature=0).choices[0].message.content
    alone = greedy()
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=fid, hyperparameters={"n_epochs": 50, "batch_size": 1},
                                         metadata={"team": "search", "run": "cancel-test"})
    assert job.metadata == {"team": "search", "run": "cancel-test"}
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"run": "cancel-test"})] == [job.id]
    assert not list(client.fine_tuning.jobs.list(metadata={"run": "other"}))
    # Inference while the job trains in the same iterations: the same greedy text.
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    assert greedy() == alone
    # While it runs, its latest checkpoint answers by name.
    for _ in range(1200):
        ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
        if ckpts:
            break
        time.sleep(0.25)
    assert ckpts, "no checkpoint while the job ran"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    out = client.chat.completions.create(model=ckpts[0].fine_tuned_model_checkpoint, messages=Q, max_tokens=8, temperature=0)
    assert out.choices[0].message.content
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    assert client.fine_tuning.jobs.resume(job.id).status == "running"
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert wait_for(client, job.id, ("cancelled",)).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=MODEL, training_file="file-nope")
    assert e.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=fid)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=MODEL, training_file=fid, hyperparameters={"n_epochs": 0})
    assert e.value.body["param"] == "n_epochs"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model=MODEL, training_file=fid, extra_body={"lora": {"target_modules": ["lm_head"]}})
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=MODEL, training_file=fid, metadata={f"k{i}": "v" for i in range(17)})
    assert e.value.body["param"] == "metadata"


def test_kill_9_during_a_job_then_restart_resumes_it_from_its_checkpoint():
    data = tempfile.mkdtemp()
    proc, url = start("--data-dir", data)
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x")
        fid = upload_training_file(c)
        # 5 epochs of 3 steps: checkpoints at steps 3, 6, 9 and 12, more than the 3 a job keeps.
        job = c.fine_tuning.jobs.create(model=MODEL, training_file=fid, hyperparameters={"n_epochs": 5, "batch_size": 1})
        for _ in range(1200):
            if c.fine_tuning.jobs.checkpoints.list(job.id).data:
                break
            time.sleep(0.25)
        assert c.fine_tuning.jobs.retrieve(job.id).status == "running"
    finally:
        proc.kill()  # kill -9 mid-job
        proc.wait(timeout=30)
    proc, url = start("--data-dir", data)
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x")
        assert c.files.retrieve(fid).bytes > 0
        done = wait_for(c, job.id, ("succeeded", "failed", "cancelled"))
        assert done.status == "succeeded", done.error
        messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data]
        resumed = [m for m in messages if m.startswith("Resumed after a restart from step ")]
        assert resumed and int(resumed[0].split()[-1]) in (3, 6, 9, 12), messages  # a checkpoint's step
        steps = sorted({e.data["step"] for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"})
        assert steps == list(range(1, 16)), steps
        # Checkpoints from before the restart count among the three kept: the oldest went.
        kept = sorted(k.step_number for k in c.fine_tuning.jobs.checkpoints.list(job.id).data)
        assert kept == [6, 9, 12], kept
        assert sorted(os.listdir(os.path.join(data, "checkpoints", job.id))) == ["step-12", "step-6", "step-9"]
        ask = c.chat.completions.create(model=done.fine_tuned_model, messages=Q, max_tokens=8, temperature=0)
        before = ask.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    proc, url = start("--data-dir", data)
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x")
        assert done.fine_tuned_model in [m.id for m in c.models.list().data]
        again = c.chat.completions.create(model=done.fine_tuned_model, messages=Q, max_tokens=8, temperature=0)
        assert again.choices[0].message.content == before
        assert c.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_sigterm_checkpoints_a_running_job_and_a_torn_checkpoint_falls_back():
    import signal
    data = tempfile.mkdtemp()
    metric_steps = lambda c, jid: sorted({e.data["step"] for e in c.fine_tuning.jobs.list_events(jid, limit=100)
                                          if e.type == "metrics" and "train_loss" in e.data})
    ckpt_steps = lambda c, jid: sorted(k.step_number for k in c.fine_tuning.jobs.checkpoints.list(jid, limit=100))

    def sigterm_mid_epoch(proc, c, jid, after):
        # Past step `after`, at a step that is not an epoch's end (3 examples, batches of 1).
        for _ in range(2400):
            steps = metric_steps(c, jid)
            if steps and steps[-1] > after and steps[-1] % 3 != 0:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0

    proc, url = start("--data-dir", data)
    c = openai.OpenAI(base_url=url + "/v1", api_key="x")
    fid = upload_training_file(c)
    job = c.fine_tuning.jobs.create(model=MODEL, training_file=fid, hyperparameters={"n_epochs": 12, "batch_size": 1},
                                    extra_body={"lora": {"r": 2, "target_modules": ["q_proj"]}})
    sigterm_mid_epoch(proc, c, job.id, 1)
    # Restarted: the shutdown checkpoint is the last step trained, and the job resumes there.
    proc, url = start("--data-dir", data)
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x")
        last = metric_steps(c, job.id)[-1]
        assert ckpt_steps(c, job.id)[-1] == last, (last, ckpt_steps(c, job.id))
        resumed = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100) if e.message.startswith("Resumed")]
        assert resumed[0] == f"Resumed after a restart from step {last}", resumed
        sigterm_mid_epoch(proc, c, job.id, last + 3)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The newest checkpoint torn (truncated): the restart resumes from the one before it.
    ckpt_root = os.path.join(data, "checkpoints", job.id)
    steps = sorted(int(d.split("-")[1]) for d in os.listdir(ckpt_root) if d.startswith("step-") and not d.endswith(".tmp"))
    newest, previous = steps[-1], steps[-2]
    with open(os.path.join(ckpt_root, f"step-{newest}", "adapter_model.safetensors"), "r+b") as f:
        f.truncate(20)
    proc, url = start("--data-dir", data)
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x")
        done = wait_for(c, job.id, ("succeeded", "failed", "cancelled"))
        assert done.status == "succeeded", done.error
        messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert any(m.startswith(f"The checkpoint at step {newest} cannot be read") for m in messages), messages
        assert f"Resumed after a restart from step {previous}" in messages, messages
        assert metric_steps(c, job.id) == list(range(1, 37))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def small_volume():
    """A fresh 6 MB tmpfs (the test is skipped where it cannot be mounted: it needs root)."""
    mnt = os.path.join(tempfile.mkdtemp(), "small")
    os.makedirs(mnt)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", mnt], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    return mnt


def fill(mnt):
    """Fills the volume with one file until the disk is full; returns its path."""
    filler = os.path.join(mnt, "filler")
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_fails_uploads_and_jobs_with_507_and_serving_goes_on():
    mnt = small_volume()
    proc = None
    try:
        data = os.path.join(mnt, "data")
        proc, url = start("--data-dir", data)
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        kept = upload_training_file(c)
        # Fill the disk.
        filler = fill(mnt)
        big = [{"text": "w" * 200}] * 2000
        with pytest.raises(openai.APIStatusError) as e:
            c.files.create(file=open(write_training_file(big), "rb"), purpose="fine-tune")
        assert e.value.status_code == 507 and e.value.body["code"] == "insufficient_storage", e.value.body
        with pytest.raises(openai.APIStatusError) as e:
            for _ in range(50):  # the database may have a free page or two left
                c.fine_tuning.jobs.create(model=MODEL, training_file=kept, hyperparameters={"n_epochs": 1})
        assert e.value.status_code == 507, e.value.body
        # Serving goes on.
        out = c.chat.completions.create(model=MODEL, messages=Q, max_tokens=4, temperature=0)
        assert out.choices[0].message.content
        # Space returns: uploads and jobs work again, and nothing acknowledged was lost.
        os.remove(filler)
        again = c.files.create(file=open(write_training_file(), "rb"), purpose="fine-tune")
        assert c.files.retrieve(kept).bytes > 0 and c.files.retrieve(again.id).bytes > 0
        job = c.fine_tuning.jobs.create(model=MODEL, training_file=again.id, hyperparameters={"n_epochs": 1, "batch_size": 3},
                                        extra_body={"lora": {"r": 2, "target_modules": ["q_proj"]}})
        assert wait_for(c, job.id, ("succeeded", "failed", "cancelled")).status == "succeeded"
        # Jobs refused for lack of space left nothing behind.
        assert [j.id for j in c.fine_tuning.jobs.list(limit=100)] == [job.id]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        subprocess.run(["umount", mnt])


def test_a_job_training_through_a_full_disk_loses_no_step_and_keeps_its_last_three_checkpoints():
    mnt = small_volume()
    proc = None
    try:
        proc, url = start("--data-dir", os.path.join(mnt, "data"))
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        fid = upload_training_file(c)
        # One step an epoch, so a checkpoint (~0.85 MB here) after every step.
        job = c.fine_tuning.jobs.create(model=MODEL, training_file=fid, hyperparameters={"n_epochs": 40, "batch_size": 3},
                                        extra_body={"lora": {"r": 2, "target_modules": ["q_proj"]}})
        filler = fill(mnt)
        time.sleep(3)  # training goes on; checkpoints and events cannot be written meanwhile
        os.remove(filler)
        done = wait_for(c, job.id, ("succeeded", "failed", "cancelled"), timeout=200)
        assert done.status == "succeeded", done.error
        events = list(c.fine_tuning.jobs.list_events(job.id, limit=100))
        # Every step's event reached the store (late, once there was room), and the failed
        # checkpoints were said.
        assert sorted(e.data["step"] for e in events if e.type == "metrics") == list(range(1, 41))
        assert any("could not be written" in e.message for e in events), [e.message for e in events]
        # Old checkpoints leave the disk: the last three are kept, listed and served.
        ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data
        assert [k.step_number for k in ckpts] == [39, 38, 37], [k.step_number for k in ckpts]
        assert sorted(os.listdir(os.path.join(mnt, "data", "checkpoints", job.id))) == ["step-37", "step-38", "step-39"]
        out = c.chat.completions.create(model=ckpts[0].fine_tuned_model_checkpoint, messages=Q, max_tokens=2)
        assert out.choices[0].message.content is not None
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        subprocess.run(["umount", mnt])


def test_request_ids_come_back_and_every_log_line_about_a_request_carries_it():
    proc, url = start("--log-format", "json", env=dict(os.environ, RUST_LOG="info"))
    try:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, headers={"x-request-id": "trace-me-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-me-42"
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                          headers={"x-request-id": "stream-7"}) as s:
            assert s.headers["x-request-id"] == "stream-7"
            assert any(l == "data: [DONE]" for l in s.iter_lines())
        generated = httpx.get(url + "/v1/models").headers["x-request-id"]
        assert generated.startswith("req-")
        bad = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}, headers={"x-request-id": "bad-1"})
        assert bad.status_code == 404 and bad.headers["x-request-id"] == "bad-1"
        time.sleep(0.5)
        lines = [json.loads(l) for l in open(proc.log_path) if l.startswith("{")]
        assert lines, "no JSON log lines"
        assert all({"timestamp", "level", "message"} <= l.keys() for l in lines)
        for rid in ["trace-me-42", "stream-7"]:
            mine = {l["message"] for l in lines if l.get("span", {}).get("request_id") == rid}
            # The HTTP layer's line, and the engine thread's lines about the same request.
            assert {"http", "request queued", "request finished"} <= mine, (rid, mine)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
