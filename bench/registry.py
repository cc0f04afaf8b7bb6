"""Registry benchmark: upload → first answer, 1,000 active tasks vs 1, RSS and cold restart with many
registered tasks. Real MiniLM server on loopback, real texts; last line one JSON object.

    python -m bench.registry --quick     # 2,000 registered tasks
    python -m bench.registry             # 10,000 registered tasks
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from bench.adapters import bench_adapter
from bench.serve import closed_loop
from bench.texts import sample_texts
from switchboard.adapter_store.formats import native
from switchboard.clients.local_server import free_port, running_process
from switchboard.server.core.backbone import load_backbone


def over_budget_phase(spec, texts: list[str], n_tasks: int, budget: int, duration: float) -> dict[str, float]:
    """Houlsby m=64 tasks whose bytes exceed the slot budget: uniform traffic forces LRU reloads."""
    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {"SWITCHBOARD_MAX_ADAPTER_BYTES": str(budget)}
        with running_process(serve_cmd(port, data), url, Path(data) / "server.log", env=env):
            fp = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
            blobs = [native.dumps(bench_adapter(spec, "houlsby", seed=i), fp) for i in range(8)]
            register_many(url, blobs, n_tasks)  # 8 distinct weights, n names: distinct slots all the same
            rng = random.Random(1)
            uniform = [f"bulk-{rng.randrange(n_tasks)}" for _ in range(4000)]
            one = asyncio.run(closed_loop(url, ["bulk-0"], texts, 64, duration))["rps"]
            many = asyncio.run(closed_loop(url, uniform, texts, 64, duration))["rps"]
            evictions = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
                         if line.startswith("switchboard_adapter_evictions_total")]
    print(f"houlsby, {n_tasks} tasks ({n_tasks * len(blobs[0]) / 2**20:.0f} MiB) over a {budget / 2**20:.0f} MiB "
          f"budget: {many:.1f} req/s vs {one:.1f} with one task; {evictions}", flush=True)
    return {"houlsby_over_budget_rps": many, "houlsby_one_task_rps": one,
            "houlsby_over_budget_vs_1": many / one, "houlsby_over_budget_tasks": n_tasks}


def serve_cmd(port: int, data_dir: str) -> list[str]:
    return [sys.executable, "-m", "switchboard.clients.cli", "serve", "--port", str(port), "--data-dir", data_dir,
            "--log-level", "warning", "--max-length", "128"]


def upload_to_first_answer(client: httpx.Client, blob: bytes, task: str, text: str) -> float:
    """PUT, then the first classify of the new task, on one kept-alive connection as a client would."""
    start = time.perf_counter()
    client.put(f"/v1/tasks/{task}", files=[("files", ("adapter.safetensors", blob))]).raise_for_status()
    client.post("/v1/classify", json={"task": task, "inputs": text}).raise_for_status()
    return (time.perf_counter() - start) * 1000


def register_many(url: str, blobs: list[bytes], n: int, offset: int = 0, workers: int = 4) -> float:
    def one(i: int) -> None:
        with httpx.Client(timeout=120) as c:
            c.put(f"{url}/v1/tasks/bulk-{offset + i}",
                  files=[("files", ("adapter.safetensors", blobs[i % len(blobs)]))]).raise_for_status()

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(n)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--registered", type=int, default=None)
    args = parser.parse_args()
    registered = args.registered or (2000 if args.quick else 10000)
    samples = 10 if args.quick else 30
    duration = 10.0 if args.quick else 30.0
    spec = load_backbone().spec
    texts = sample_texts(2000, seed=4)
    out: dict[str, object] = {"registered": registered}
    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with running_process(serve_cmd(port, data), url, Path(data) / "server.log") as (proc, ready_s):
            fp = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
            client = httpx.Client(base_url=url, timeout=60)
            for kind in ("ia3", "houlsby"):
                times = [upload_to_first_answer(client, native.dumps(bench_adapter(spec, kind, seed=10_000 + i), fp),
                                                f"fresh-{kind}-{i}", texts[i]) for i in range(samples)]
                out[f"upload_to_serve_ms_{kind}"] = statistics.median(times)
                out[f"upload_to_serve_p95_ms_{kind}"] = sorted(times)[int(0.95 * (len(times) - 1))]
                print(f"upload → first answer, {kind}: p50 {statistics.median(times):.0f} ms over {samples}", flush=True)

            # 1,000 active IA3 tasks vs 1, requests spread uniformly, closed-loop saturation
            blobs = [native.dumps(bench_adapter(spec, "ia3", seed=i), fp) for i in range(1000)]
            register_many(url, blobs, 1000, offset=0)
            rng = random.Random(0)
            uniform = [f"bulk-{rng.randrange(1000)}" for _ in range(4000)]
            rates = {}
            for name, tasks in (("1", ["bulk-0"]), ("1000", uniform), ("1 again", ["bulk-0"]), ("1000 again", uniform)):
                rates[name] = asyncio.run(closed_loop(url, tasks, texts, 64, duration))["rps"]
                print(f"active {name}: {rates[name]:.1f} req/s", flush=True)
            out["rps_active_1"] = (rates["1"] + rates["1 again"]) / 2
            out["rps_active_1000"] = (rates["1000"] + rates["1000 again"]) / 2
            out["active_1000_vs_1"] = out["rps_active_1000"] / out["rps_active_1"]

            # many registered tasks: RSS growth vs the adapters' own bytes
            rss0 = psutil.Process(proc.pid).memory_info().rss
            extra = registered - 1000
            seconds = register_many(url, blobs, extra, offset=1000)
            rss1 = psutil.Process(proc.pid).memory_info().rss
            per_task = len(blobs[0])
            out["uploads_per_s"] = extra / seconds
            out["rss_growth_mb"] = (rss1 - rss0) / 2**20
            out["adapter_bytes_mb"] = extra * per_task / 2**20
            print(f"{extra} more uploads in {seconds:.0f} s; RSS +{out['rss_growth_mb']:.0f} MiB for "
                  f"{out['adapter_bytes_mb']:.0f} MiB of adapters", flush=True)
        # cold restart on the same data dir
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with running_process(serve_cmd(port, data), url, Path(data) / "server2.log") as (proc, ready_s):
            first = time.perf_counter()
            httpx.post(f"{url}/v1/classify", json={"task": f"bulk-{registered - 1}", "inputs": texts[0]},
                       timeout=60).raise_for_status()
            out[f"restart_s_{registered}"] = ready_s
            out["restart_first_answer_ms"] = (time.perf_counter() - first) * 1000
            out["restart_tasks_listed"] = len(httpx.get(f"{url}/v1/tasks", timeout=60).json()["tasks"])
            out["restart_rss_mb"] = psutil.Process(proc.pid).memory_info().rss / 2**20
            print(f"restart with {registered} tasks: ready in {ready_s:.1f} s, first answer "
                  f"{out['restart_first_answer_ms']:.0f} ms, RSS {out['restart_rss_mb']:.0f} MiB", flush=True)
    out |= over_budget_phase(spec, texts, 300 if args.quick else 1000, 256 << 20 if args.quick else 1 << 30, duration)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
