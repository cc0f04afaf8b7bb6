"""Replicas on a shared PostgreSQL store, side by side in one run (real MiniLM, Debian's PostgreSQL and
nginx started here on loopback):

1. propagation: an upload acknowledged by replica A → first 200 from replica B (p50 / p99);
2. throughput: one replica with 2 torch threads vs two replicas with 1 thread each behind nginx
   hashing on `X-Switchboard-Task` (the same 2 cores split), closed loop over 10 (IA)³ tasks;
3. residency: 1,000 tasks over 2 replicas whose slot budgets hold ~60 % of them each — the hit rate
   (requests that found their task resident) with affinity vs round robin;
4. stores: uploads/s over HTTP and a cold restart with 10,000 tasks, SQLite vs PostgreSQL.

    python -m bench.replicas --quick
    python -m bench.replicas
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.adapters import bench_adapter
from bench.serve import closed_loop
from bench.texts import sample_texts
from switchboard.adapter_store.formats import native
from switchboard.adapter_store.store import open_store
from switchboard.clients.local_server import running_process
from switchboard.clients.local_services import free_port, nginx, postgres_cluster
from switchboard.server.core.backbone import load_backbone

ROOT = Path(__file__).resolve().parent.parent


def serve(stack: ExitStack, store: str | None, threads: int, env: dict[str, str] | None = None) -> str:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    cmd = [sys.executable, "-m", "switchboard.clients.cli", "serve", "--port", str(port), "--data-dir", str(data),
           "--threads", str(threads), "--log-level", "warning", "--max-length", "128"]
    if store:
        cmd += ["--store", store]
    stack.enter_context(running_process(cmd, url, data / "server.log", env=env))
    return url


def proxy(stack: ExitStack, replicas: list[str], affinity: bool = True) -> str:
    text = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    port = free_port()
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    if not affinity:
        text = text.replace("hash $http_x_switchboard_task consistent;", "")  # round robin
    for name, url in zip(("replica-1:8000", "replica-2:8000"), replicas, strict=True):
        text = text.replace(name, url.removeprefix("http://"))
    return stack.enter_context(nginx(text, port))


def metric(url: str, name: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
               for s in f.samples if s.name == name)


def upload(url: str, task: str, blob: bytes) -> httpx.Response:
    return httpx.put(f"{url}/v1/tasks/{task}", files=[("files", ("a.safetensors", blob))],
                     headers={"X-Switchboard-Task": task}, timeout=60)


def propagation(store: str, blobs: list[bytes]) -> dict:
    with ExitStack() as stack:
        a, b = serve(stack, store, 1), serve(stack, store, 1)
        delays = []
        with httpx.Client(timeout=30) as client:
            for i, blob in enumerate(blobs):
                task = f"prop-{i}"
                upload(a, task, blob).raise_for_status()
                acked = time.monotonic()
                while client.post(f"{b}/v1/classify", json={"task": task, "inputs": "x"}).status_code != 200:
                    time.sleep(0.005)
                delays.append(time.monotonic() - acked)
    ms = np.array(delays) * 1000
    return {"uploads": len(delays), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def throughput(store: str, blobs: list[bytes], texts: list[str], duration: float) -> dict:
    tasks = [f"tp-{i}" for i in range(len(blobs))]
    out = {}
    for layout in ("one", "two", "one", "two"):  # alternated: drift hits both
        with ExitStack() as stack:
            if layout == "one":
                target = serve(stack, store, 2)
            else:
                target = proxy(stack, [serve(stack, store, 1), serve(stack, store, 1)])
            for task, blob in zip(tasks, blobs, strict=True):
                if httpx.get(f"{target}/v1/tasks/{task}", headers={"X-Switchboard-Task": task}).status_code == 404:
                    upload(target, task, blob).raise_for_status()
            asyncio.run(closed_loop(target, tasks, texts, 32, 3.0))  # warm-up
            run = asyncio.run(closed_loop(target, tasks, texts, 32, duration))
            out.setdefault(layout, []).append(run["rps"])
    one, two = statistics.mean(out["one"]), statistics.mean(out["two"])
    return {"one_replica_2_threads_rps": one, "two_replicas_1_thread_nginx_rps": two, "two_vs_one": two / one}


def residency(store: str, spec, fingerprint: str, n_tasks: int, requests: int) -> dict:
    """Hit rate = 1 − loads / requests once every task is uploaded, each replica's slot budget
    holding ~60 % of the tasks: with affinity each replica needs only its half."""
    blobs = [native.dumps(bench_adapter(spec, "ia3", seed=i), fingerprint) for i in range(n_tasks)]
    texts = sample_texts(50, seed=1)
    result = {}
    tasks = [f"res-{i}" for i in range(n_tasks)]
    with ExitStack() as stack:  # upload once; the store keeps the tasks for both layouts
        replica = serve(stack, store, 1)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: upload(replica, tasks[i], blobs[i]).raise_for_status(), range(n_tasks)))
        per_task = metric(replica, "switchboard_resident_adapter_bytes") / max(
            1.0, metric(replica, "switchboard_resident_adapters"))
        budget = int(per_task * n_tasks * 0.6)
    for affinity in (True, False):
        with ExitStack() as stack:
            env = {"SWITCHBOARD_MAX_ADAPTER_BYTES": str(budget)}
            replicas = [serve(stack, store, 1, env) for _ in range(2)]
            target = proxy(stack, replicas, affinity)
            rng = np.random.default_rng(0)
            order = [tasks[i] for i in rng.integers(0, n_tasks, size=requests)]

            def one(i: int) -> int:
                return httpx.post(f"{target}/v1/classify", json={"task": order[i], "inputs": texts[i % 50]},
                                  headers={"X-Switchboard-Task": order[i]}, timeout=60).status_code

            with ThreadPoolExecutor(8) as pool:  # a first pass fills the slots; the second is measured
                list(pool.map(one, range(requests)))
                before = sum(metric(r, "switchboard_adapter_loads_total") for r in replicas)
                statuses = list(pool.map(one, range(requests)))
            loads = sum(metric(r, "switchboard_adapter_loads_total") for r in replicas) - before
            result["affinity" if affinity else "round_robin"] = {
                "hit_rate": 1 - loads / requests, "loads": loads, "ok": statuses.count(200), "requests": requests}
    return result


def stores(pg: str, spec, fingerprint: str, uploads: int, restart_tasks: int) -> dict:
    blobs = [native.dumps(bench_adapter(spec, "ia3", seed=i), fingerprint) for i in range(uploads)]
    out = {}
    for name, store in (("sqlite", None), ("postgresql", pg)):
        with ExitStack() as stack:
            url = serve(stack, store, 2)
            start = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda i: upload(url, f"up-{i}", blobs[i]).raise_for_status(), range(uploads)))
            out[f"{name}_uploads_per_s"] = uploads / (time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as data:
            backend = open_store(store, Path(data))
            blob = blobs[0]
            sha = f"{12345:064x}"
            for i in range(restart_tasks):
                backend.add_version(f"tenant-{i % 10}", f"cold-{i}", sha, "ia3", ["a", "b"], 10, len(blob), blob)
            backend.close()
            port = free_port()
            cmd = [sys.executable, "-m", "switchboard.clients.cli", "serve", "--port", str(port), "--data-dir", data,
                   "--log-level", "warning"] + (["--store", store] if store else [])
            with running_process(cmd, f"http://127.0.0.1:{port}", Path(data) / "server.log") as (_, ready_s):
                out[f"{name}_cold_start_{restart_tasks}_tasks_s"] = ready_s
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["residency"], default=None)
    args = parser.parse_args()
    spec = load_backbone().spec
    texts = sample_texts(2000, seed=6)
    with postgres_cluster() as cluster:
        with ExitStack() as stack:  # the fingerprint, from a throw-away server
            fingerprint = httpx.get(f"{serve(stack, None, 1)}/v1/backbone").json()["fingerprint"]
        blobs = [native.dumps(bench_adapter(spec, "ia3", seed=i), fingerprint) for i in range(10)]
        results: dict = {}
        only = args.only
        if only:  # one part alone (while tuning the bench)
            fn = {"residency": lambda: residency(cluster.new_database(), spec, fingerprint, 200 if args.quick else 1000,
                                                 1000 if args.quick else 4000)}[only]
            print(json.dumps({only: fn()}))
            return
        results["propagation"] = propagation(cluster.new_database(), blobs * (2 if args.quick else 5))
        print(json.dumps({"propagation": results["propagation"]}), flush=True)
        results["throughput"] = throughput(cluster.new_database(), blobs, texts, 10.0 if args.quick else 20.0)
        print(json.dumps({"throughput": results["throughput"]}), flush=True)
        results["stores"] = stores(cluster.new_database(), spec, fingerprint, 50 if args.quick else 200,
                                   2000 if args.quick else 10_000)
        print(json.dumps({"stores": results["stores"]}), flush=True)
        results["residency"] = residency(cluster.new_database(), spec, fingerprint, 200 if args.quick else 1000,
                                         1000 if args.quick else 4000)
        print(json.dumps({"residency": results["residency"]}), flush=True)
    print(json.dumps({k: {kk: round(vv, 3) if isinstance(vv, float) else vv for kk, vv in v.items()}
                      if isinstance(v, dict) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
