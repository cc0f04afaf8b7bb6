"""Overload with long inputs: are excess requests refused at admission (429) or left to time out (503)?

One run, real MiniLM on loopback, texts of ~512 tokens (Debian descriptions joined). For each server
configuration: saturation (closed loop), latency when unloaded (open loop at 20 % of saturation), then
5× saturation (open loop) — how many requests got 200 / 429 / 503, and the admitted requests' latency.
Two configurations side by side: the defaults (admission by tokens and estimated wait) and the old
behaviour (a queue bounded in rows only), selected with settings.

    python -m bench.overload --quick     # ~4 minutes
    python -m bench.overload
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time

import httpx
import numpy as np

from bench.adapters import bench_adapter
from bench.http_load import ConnectionPool
from bench.serve import closed_loop, default_server
from bench.texts import debian_descriptions
from switchboard.adapter_store.formats import native
from switchboard.server.core.backbone import load_backbone

ROW_BOUNDED = {"SWITCHBOARD_MAX_QUEUE_TOKENS": str(10**12), "SWITCHBOARD_MAX_QUEUE_DELAY_S": str(10**9),
               "SWITCHBOARD_QUEUE_TARGET_MS": str(10**9)}


def long_texts(n: int, chars: int = 3000) -> list[str]:
    """Debian descriptions joined to ≥ `chars` characters: each truncates at MiniLM's 512 tokens."""
    pool = debian_descriptions()
    out, i = [], 0
    for _ in range(n):
        text = ""
        while len(text) < chars:
            text += " " + pool[i % len(pool)]
            i += 7
        out.append(text)
    return out


async def open_loop(url: str, tasks: list[str], texts: list[str], rate: float, duration: float,
                    seed: int = 0, connections: int = 512, headers: dict[str, str] | None = None) -> dict:
    """Poisson arrivals; every request's status and latency from its scheduled time."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * duration * 1.5) + 10))
    arrivals = arrivals[arrivals < duration]
    statuses: collections.Counter[int] = collections.Counter()
    latencies: list[float] = []
    retry_after: collections.Counter[str] = collections.Counter()

    async def one(pool: ConnectionPool, i: int, at: float, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        try:
            status, _ = await pool.post_json("/v1/classify", {"task": tasks[i % len(tasks)],
                                                              "inputs": texts[i % len(texts)]})
        except (OSError, asyncio.IncompleteReadError):
            status = -1
        statuses[status] += 1
        if status == 200:
            latencies.append(time.monotonic() - (t0 + at))

    pool = ConnectionPool(url, connections, headers)
    t0 = time.monotonic() + 0.2
    await asyncio.gather(*[one(pool, i, float(at), t0) for i, at in enumerate(arrivals)])
    await pool.close()
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"offered_rps": rate, "requests": int(sum(statuses.values())), "statuses": dict(statuses),
            "ok_rps": statuses.get(200, 0) / duration,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "retry_after": dict(retry_after)}


def measure(name: str, env: dict[str, str], texts: list[str], duration: float) -> dict:
    with default_server(env) as (url, _):
        spec = load_backbone().spec
        fp = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
        with httpx.Client(timeout=60) as client:
            for i in range(10):
                blob = native.dumps(bench_adapter(spec, "ia3", seed=i), fp)
                client.put(f"{url}/v1/tasks/task-{i}", files=[("files", ("a.safetensors", blob))]).raise_for_status()
        tasks = [f"task-{i}" for i in range(10)]
        asyncio.run(closed_loop(url, tasks, texts, 8, 5.0))  # warm-up
        sat = asyncio.run(closed_loop(url, tasks, texts, 8, duration))
        unloaded = asyncio.run(open_loop(url, tasks, texts, 0.2 * sat["rps"], duration, seed=1))
        over = asyncio.run(open_loop(url, tasks, texts, 5.0 * sat["rps"], duration, seed=2))
    s = over["statuses"]
    rejected = sum(n for code, n in s.items() if code != 200)
    row = {"config": name, "saturation_rps": sat["rps"], "unloaded_p50_ms": unloaded["p50_ms"],
           "unloaded_p99_ms": unloaded["p99_ms"], "unloaded_errors": unloaded["requests"] - unloaded["statuses"].get(200, 0),
           "overload_rps": over["offered_rps"], "overload_requests": over["requests"], "statuses": s,
           "admitted_p50_ms": over["p50_ms"], "admitted_p99_ms": over["p99_ms"],
           "rejected_as_429": s.get(429, 0) / rejected if rejected else 1.0,
           "admitted_p99_vs_unloaded": over["p99_ms"] / unloaded["p99_ms"]}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--only-defaults", action="store_true")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE settings for the default server")
    args = parser.parse_args()
    duration = args.duration or (20.0 if args.quick else 40.0)
    texts = long_texts(200)
    env = dict(kv.split("=", 1) for kv in args.env)
    rows = [measure("defaults: admission by tokens and estimated wait", env, texts, duration)]
    if not args.only_defaults:
        rows.append(measure("old: queue bounded in rows only", ROW_BOUNDED, texts, duration))
    print(f"\n{'configuration':52s}{'sat req/s':>10s}{'p99 idle':>10s}{'offered':>9s}{'200':>6s}{'429':>6s}"
          f"{'503':>6s}{'p99 adm.':>10s}{'429 share':>10s}")
    for r in rows:
        s = r["statuses"]
        print(f"{r['config']:52s}{r['saturation_rps']:10.1f}{r['unloaded_p99_ms']:10.0f}{r['overload_rps']:9.1f}"
              f"{s.get(200, 0):6d}{s.get(429, 0):6d}{s.get(503, 0):6d}{r['admitted_p99_ms']:10.0f}"
              f"{r['rejected_as_429']:10.2f}")
    d = rows[0]
    print(json.dumps({"rejected_as_429": round(d["rejected_as_429"], 4),
                      "admitted_p99_vs_unloaded": round(d["admitted_p99_vs_unloaded"], 3),
                      "admitted_p99_ms": round(d["admitted_p99_ms"], 1), "unloaded_p99_ms": round(d["unloaded_p99_ms"], 1),
                      "saturation_rps": round(d["saturation_rps"], 2), "statuses": d["statuses"]}))


if __name__ == "__main__":
    main()
