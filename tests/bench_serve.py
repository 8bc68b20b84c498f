"""Load generator for `tandem serve`: replays the same requests one at a time, then with Poisson
arrivals at several rates, streaming each; reports throughput and TTFT / TPOT p50 and p99.

usage: python3 tests/bench_serve.py --url http://127.0.0.1:8000 [--requests 32] [--rates 1,2,4]
       [--max-tokens 32] [--model NAME]        (needs httpx)
"""
import argparse, asyncio, json, random, statistics, time
import httpx

PROMPTS = ["Write a haiku about {}.", "Explain {} to a child.", "List three facts about {}.", "Tell a short story about {}."]
TOPICS = ["the sea", "volcanoes", "bees", "the moon", "trains", "rain", "chess", "bread"]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


async def one(client, url, model, prompt, max_tokens):
    t0 = time.perf_counter()
    first, n = None, 0
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    ttft = (first or end) - t0
    tpot = (end - (first or end)) / max(n - 1, 1)
    return ttft, tpot, n


async def run(url, model, reqs, rate, max_tokens):
    async with httpx.AsyncClient(timeout=None) as client:
        t0 = time.perf_counter()
        if rate is None:
            res = [await one(client, url, model, p, max_tokens) for p in reqs]
        else:
            rng = random.Random(0)
            async def delayed(p, at):
                await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
                return await one(client, url, model, p, max_tokens)
            at, tasks = 0.0, []
            for p in reqs:
                tasks.append(asyncio.create_task(delayed(p, at)))
                at += rng.expovariate(rate)
            res = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ttft = [r[0] for r in res]
    tpot = [r[1] for r in res if r[2] > 1]
    toks = sum(r[2] for r in res)
    return dict(rate="one at a time" if rate is None else f"{rate}/s", requests=len(reqs), tokens=toks,
                wall_s=round(wall, 2), tok_s=round(toks / wall, 1),
                ttft_p50_ms=round(pct(ttft, 50) * 1e3), ttft_p99_ms=round(pct(ttft, 99) * 1e3),
                tpot_p50_ms=round(pct(tpot, 50) * 1e3, 1), tpot_p99_ms=round(pct(tpot, 99) * 1e3, 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rates", default="1,2,4")
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    reqs = [PROMPTS[i % len(PROMPTS)].format(TOPICS[i % len(TOPICS)]) for i in range(a.requests)]
    rows = [asyncio.run(run(a.url, a.model, reqs, None, a.max_tokens))]
    rows += [asyncio.run(run(a.url, a.model, reqs, float(r), a.max_tokens)) for r in a.rates.split(",")]
    cols = list(rows[0].keys())
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
