"""Serving benchmark: Switchboard vs a PEFT-style server, same API, same tasks, same texts, one run.

Load: open loop (Poisson arrivals), tasks drawn from a Zipf distribution over N tasks, one real text
(Debian package description) per request. For each server: saturation throughput (closed loop, many
concurrent clients), then latency at 70 % of that saturation (open loop), and both servers also at one
common offered load. `engine_rps` is the engine's own forward throughput on the same texts and tasks.

    python -m bench.serve --quick     # < 5 minutes
    python -m bench.serve

Servers run one at a time (this machine has 2 cores), each as its own process on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.adapters import PEFT_BERT_SITES, bench_adapter
from bench.http_load import Connection, ConnectionPool
from bench.texts import sample_texts
from switchboard.adapter_store.formats import native
from switchboard.clients.local_server import free_port, running_process
from switchboard.server.core.backbone import load_backbone
from switchboard.server.core.engine import Engine
from switchboard.server.core.precision import resolve


def zipf_tasks(n_tasks: int, n: int, s: float, rng: random.Random) -> list[str]:
    weights = [1.0 / (k + 1) ** s for k in range(n_tasks)]
    return [f"task-{i}" for i in rng.choices(range(n_tasks), weights=weights, k=n)]


@contextmanager
def server_process(cmd: list[str], url: str, env: dict[str, str] | None = None):
    with tempfile.TemporaryDirectory() as logs:
        with running_process(cmd, url, Path(logs) / "server.log", env=env) as (proc, ready_s):
            yield proc, ready_s


@contextmanager
def default_server(env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """`switchboard serve` on the defaults (real MiniLM, full length, default layout): (url, port)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        cmd = [sys.executable, "-m", "switchboard.clients.cli", "serve", "--port", str(port), "--data-dir", data,
               "--log-level", "warning"]
        with running_process(cmd, url, Path(data) / "server.log", env=env):
            yield url, port


async def closed_loop(url: str, tasks: list[str], texts: list[str], concurrency: int, duration: float,
                      ramp: float = 1.0, headers: dict[str, str] | None = None) -> dict:
    """Saturation: `concurrency` clients send back-to-back for `duration` seconds; a client told 429
    waits its Retry-After, as a well-behaved client does. `rps` counts answered requests only."""
    done = errors = refused = 0
    stop = time.monotonic() + duration
    counter = iter(range(10**9))

    async def client_loop(conn: Connection, start_after: float) -> None:
        nonlocal done, errors, refused
        await asyncio.sleep(start_after)
        while time.monotonic() < stop:
            i = next(counter)
            status, _ = await conn.post_json("/v1/classify", {"task": tasks[i % len(tasks)],
                                                              "inputs": texts[i % len(texts)]})
            if status == 429:
                refused += 1
                await asyncio.sleep(min(conn.retry_after or 1.0, max(0.0, stop - time.monotonic())))
                continue
            done += status == 200
            errors += status != 200

    conns = [Connection(url, headers) for _ in range(concurrency)]
    start = time.monotonic()
    # clients join over `ramp` seconds, as a real population does, not in the same millisecond
    await asyncio.gather(*[client_loop(c, ramp * i / concurrency) for i, c in enumerate(conns)])
    elapsed = time.monotonic() - start
    for c in conns:
        await c.close()
    return {"rps": done / elapsed, "errors": errors, "refused": refused, "requests": done}


async def open_loop(url: str, tasks: list[str], texts: list[str], rate: float, duration: float,
                    seed: int = 0, headers: dict[str, str] | None = None) -> dict:
    """Poisson arrivals at `rate`/s; latency from each request's scheduled time (no coordinated omission)."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * duration * 1.5) + 10))
    arrivals = arrivals[arrivals < duration]
    latencies: list[float] = []
    errors = 0

    async def one(pool: ConnectionPool, i: int, at: float, t0: float) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        try:
            status, _ = await pool.post_json("/v1/classify", {"task": tasks[i % len(tasks)],
                                                              "inputs": texts[i % len(texts)]})
            ok = status == 200
        except (OSError, asyncio.IncompleteReadError):
            ok = False
        if ok:
            latencies.append(time.monotonic() - (t0 + at))
        else:
            errors += 1

    pool = ConnectionPool(url, 256, headers)
    t0 = time.monotonic() + 0.2
    await asyncio.gather(*[one(pool, i, float(at), t0) for i, at in enumerate(arrivals)])
    elapsed = time.monotonic() - t0
    await pool.close()
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"offered_rps": rate, "achieved_rps": len(latencies) / elapsed, "errors": errors,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99))}


def engine_throughput(n_tasks: int, tasks: list[str], texts: list[str], rows: int, duration: float,
                      dtype: str = "auto") -> float:
    """The engine alone, in the server's precision: forward passes over batches of `rows` requests, pre-tokenized."""
    engine = Engine(load_backbone(), precision=resolve(dtype, torch.device("cpu")))
    slots = {f"task-{i}": engine.load(bench_adapter(engine.spec, "ia3", seed=i, sites=PEFT_BERT_SITES)).slot
             for i in range(n_tasks)}
    batches = []
    for b in range(0, len(texts) - rows, rows):
        enc = engine.tokenize(texts[b:b + rows], max_length=128)
        batches.append((enc["input_ids"], enc["attention_mask"],
                        torch.tensor([slots[t] for t in tasks[b:b + rows]])))
    engine.forward(*batches[0])
    done, start = 0, time.monotonic()
    while time.monotonic() - start < duration:
        for ids, mask, s in batches:
            engine.forward(ids, mask, s)
            done += ids.shape[0]
            if time.monotonic() - start >= duration:
                break
    return done / (time.monotonic() - start)


def upload_all(url: str, n_tasks: int) -> None:
    spec_fp = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
    backbone_spec = load_backbone().spec
    with httpx.Client(timeout=60) as client:
        for i in range(n_tasks):
            blob = native.dumps(bench_adapter(backbone_spec, "ia3", seed=i, sites=PEFT_BERT_SITES), spec_fp)
            r = client.put(f"{url}/v1/tasks/task-{i}", files=[("files", ("adapter.safetensors", blob))])
            r.raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE settings for the Switchboard server")
    parser.add_argument("--saturation-only", action="store_true", help="only Switchboard's closed-loop saturation")
    args = parser.parse_args()
    duration = args.duration or (15.0 if args.quick else 40.0)
    rng = random.Random(0)
    texts = sample_texts(4000, seed=2)
    tasks = zipf_tasks(args.tasks, 4000, args.zipf, rng)
    torch.set_num_threads(2)

    env = dict(kv.split("=", 1) for kv in args.env)
    if args.saturation_only:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as data:
            cmd = [sys.executable, "-m", "switchboard.clients.cli", "serve", "--log-level", "warning", "--max-length",
                   "128", "--port", str(port), "--data-dir", data]
            with server_process(cmd, url, env):
                upload_all(url, args.tasks)
                asyncio.run(closed_loop(url, tasks, texts, args.concurrency, 5.0))
                sat = asyncio.run(closed_loop(url, tasks, texts, args.concurrency, duration))
        print(json.dumps({"env": env, "concurrency": args.concurrency, **sat}))
        return
    engine_rps = engine_throughput(args.tasks, tasks, texts, rows=64, duration=duration,
                                   dtype=env.get("SWITCHBOARD_DTYPE", "auto"))
    print(f"engine alone: {engine_rps:.1f} rows/s (batches of 64 mixed Zipf rows, forward only)", flush=True)

    report: dict[str, dict] = {}
    servers = {
        # both servers truncate at 128 tokens, as the engine measurement does
        "switchboard": [sys.executable, "-m", "switchboard.clients.cli", "serve", "--log-level", "warning", "--max-length", "128"],
        "baseline": [sys.executable, "-m", "bench.baseline_server", "--tasks", str(args.tasks)],
    }
    for name, base_cmd in servers.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as data:
            cmd = base_cmd + ["--port", str(port)] + (["--data-dir", data] if name == "switchboard" else [])
            with server_process(cmd, url, env if name == "switchboard" else None) as (_, ready_s):
                if name == "switchboard":
                    t0 = time.monotonic()
                    upload_all(url, args.tasks)
                    print(f"switchboard ready in {ready_s:.1f} s; {args.tasks} uploads in "
                          f"{time.monotonic() - t0:.1f} s", flush=True)
                # correctness spot check: the two servers must agree (same adapters, same texts)
                sample = [httpx.post(f"{url}/v1/classify", json={"task": tasks[i], "inputs": texts[i]}).json()
                          for i in range(5)]
                sat = asyncio.run(closed_loop(url, tasks, texts, args.concurrency, duration))
                print(f"{name}: saturation {sat['rps']:.1f} req/s ({sat['errors']} errors)", flush=True)
                at70 = asyncio.run(open_loop(url, tasks, texts, 0.7 * sat["rps"], duration))
                print(f"{name}: at 70% ({at70['offered_rps']:.1f} req/s) p50 {at70['p50_ms']:.0f} ms, "
                      f"p99 {at70['p99_ms']:.0f} ms, {at70['errors']} errors", flush=True)
                report[name] = {"ready_s": ready_s, "saturation": sat, "at70": at70, "sample": sample}
    # both at one common offered load: 70 % of the baseline's saturation
    common = 0.7 * report["baseline"]["saturation"]["rps"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        with server_process(servers["switchboard"] + ["--port", str(port), "--data-dir", data], url, env):
            upload_all(url, args.tasks)
            same_load = asyncio.run(open_loop(url, tasks, texts, common, duration))
    agree = max(abs(a["score"] - b["score"])
                for x, y in zip(report["switchboard"]["sample"], report["baseline"]["sample"])
                for a, b in zip(x["predictions"][0], y["predictions"][0]))
    sb, bl = report["switchboard"], report["baseline"]
    print(f"\n{'server':14s}{'sat. req/s':>12s}{'70% load':>10s}{'p50 ms':>9s}{'p95 ms':>9s}{'p99 ms':>9s}{'errors':>8s}")
    for name, r in report.items():
        a = r["at70"]
        print(f"{name:14s}{r['saturation']['rps']:12.1f}{a['offered_rps']:10.1f}{a['p50_ms']:9.0f}"
              f"{a['p95_ms']:9.0f}{a['p99_ms']:9.0f}{a['errors'] + r['saturation']['errors']:8d}")
    print(f"{'switchboard @ baseline 70% load':32s} {common:.1f} req/s: p50 {same_load['p50_ms']:.0f} ms, "
          f"p99 {same_load['p99_ms']:.0f} ms, errors {same_load['errors']}")
    print(f"max |score difference| between the two servers on 5 sample requests: {agree:.2e}")
    summary = {
        "server_rps": sb["saturation"]["rps"], "baseline_rps": bl["saturation"]["rps"], "engine_rps": engine_rps,
        "server_vs_engine": sb["saturation"]["rps"] / engine_rps,
        "server_vs_baseline": sb["saturation"]["rps"] / bl["saturation"]["rps"],
        "p50_ms": sb["at70"]["p50_ms"], "p99_ms": sb["at70"]["p99_ms"],
        "baseline_p50_ms": bl["at70"]["p50_ms"], "baseline_p99_ms": bl["at70"]["p99_ms"],
        "p99_at_baseline_load_ms": same_load["p99_ms"],
        "errors": sb["at70"]["errors"] + same_load["errors"],
        "baseline_errors": bl["at70"]["errors"],
        "ready_s": sb["ready_s"], "score_agreement": agree, "tasks": args.tasks,
    }
    print(json.dumps({k: (round(v, 4) if k != "score_agreement" else float(f"{v:.3g}")) if isinstance(v, float) else v
                      for k, v in summary.items()}))


if __name__ == "__main__":
    main()
