"""Fairness across tenants: does a tenant flooding the server starve a light one? FCFS vs VTC.

One run, real MiniLM, two servers side by side (`--scheduler fcfs`, then the default `vtc`), each in
auth mode with tenants A and B (10 (IA)³ tasks each, one short Debian description per request). For
each: saturation S (closed loop); B alone at a light steady load (open loop, 20 % of its fair share
S/2); then the same B load while A floods at 10× its fair share (5·S, open loop, from a process of
its own). Reported: B's p50 / p99 and refusals alone and under the flood, A's statuses, and the total
answered throughput.

    python -m bench.fairness --quick
    python -m bench.fairness
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import tempfile
from pathlib import Path

import httpx

from bench.adapters import bench_adapter
from bench.overload import open_loop
from bench.serve import closed_loop
from bench.texts import sample_texts
from switchboard.adapter_store.formats import native
from switchboard.clients.local_server import free_port, running_process
from switchboard.server.core.backbone import load_backbone

ADMIN = "fairness-bench-admin-key-0123456789abcdefg"


def engine_counters(url: str) -> tuple[float, float, float]:
    """(seconds of forward passes, rows, batches) so far, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
              for s in f.samples}
    return (values["switchboard_inference_duration_seconds_sum"], values["switchboard_batch_rows_sum"],
            values["switchboard_batches_total"])


def flood(url: str, tasks: list[str], texts: list[str], rate: float, duration: float, headers: dict[str, str]) -> dict:
    """A's open loop, run in a process of its own: a flooding client is another program (another host,
    in production), so its event loop must not delay B's sends or the timing of B's answers."""
    return asyncio.run(open_loop(url, tasks, texts, rate, duration, seed=2, headers=headers))


def measure(scheduler: str, texts: list[str], duration: float, extra_env: dict[str, str] | None = None) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        cmd = [sys.executable, "-m", "switchboard.clients.cli", "serve", "--port", str(port), "--data-dir", data,
               "--log-level", "warning", "--max-length", "128"]
        env = {"SWITCHBOARD_ADMIN_KEY": ADMIN, "SWITCHBOARD_SCHEDULER": scheduler,
               "SWITCHBOARD_TENANT_MAX_QUEUED_ROWS": "2048", **(extra_env or {})}
        with running_process(cmd, url, Path(data) / "server.log", env=env):
            spec = load_backbone().spec
            admin = {"Authorization": f"Bearer {ADMIN}"}
            fp = httpx.get(f"{url}/v1/backbone", headers=admin).json()["fingerprint"]
            keys, tasks = {}, {}
            for tenant in ("A", "B"):
                key = httpx.post(f"{url}/v1/keys", headers=admin, json={"tenant": tenant, "scopes": ["classify",
                                                                                                   "manage"]})
                keys[tenant] = {"Authorization": f"Bearer {key.json()['key']}"}
                tasks[tenant] = [f"{tenant.lower()}-{i}" for i in range(10)]
                for i, task in enumerate(tasks[tenant]):
                    blob = native.dumps(bench_adapter(spec, "ia3", seed=i + (100 if tenant == "B" else 0)), fp)
                    httpx.put(f"{url}/v1/tasks/{task}", headers=keys[tenant],
                              files=[("files", ("a.safetensors", blob))]).raise_for_status()
            asyncio.run(closed_loop(url, tasks["A"], texts, 32, 5.0, headers=keys["A"]))  # warm-up
            sat = asyncio.run(closed_loop(url, tasks["A"], texts, 32, duration, headers=keys["A"]))["rps"]
            light, a_rate = 0.2 * sat / 2, 10 * sat / 2
            alone = asyncio.run(open_loop(url, tasks["B"], texts, light, duration, seed=1, headers=keys["B"]))

            with multiprocessing.get_context("spawn").Pool(1) as pool:
                pool.apply(abs, (1,))  # the flooding process is up before the clock starts
                before = engine_counters(url)
                flooding = pool.apply_async(flood, (url, tasks["A"], texts, a_rate, duration, keys["A"]))
                b = asyncio.run(open_loop(url, tasks["B"], texts, light, duration, seed=3, headers=keys["B"]))
                a = flooding.get(timeout=duration + 120)
            after = engine_counters(url)
    row = {"scheduler": scheduler, "saturation_rps": sat, "b_rate": light, "a_rate": a_rate,
           "b_alone_p50_ms": alone["p50_ms"], "b_alone_p99_ms": alone["p99_ms"], "b_alone_statuses": alone["statuses"],
           "b_flood_p50_ms": b["p50_ms"], "b_flood_p99_ms": b["p99_ms"], "b_flood_statuses": b["statuses"],
           "a_flood_statuses": a["statuses"], "total_ok_rps": a["ok_rps"] + b["ok_rps"],
           "b_p99_flood_vs_alone": b["p99_ms"] / alone["p99_ms"],
           "engine_busy_flood": (after[0] - before[0]) / duration,
           "rows_per_batch_flood": (after[1] - before[1]) / max(1.0, after[2] - before[2])}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--only", choices=["fcfs", "vtc"], default=None)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE settings for both servers")
    args = parser.parse_args()
    duration = args.duration or (20.0 if args.quick else 40.0)
    texts = sample_texts(2000, seed=4)
    env = dict(kv.split("=", 1) for kv in args.env)
    rows = {s: measure(s, texts, duration, env) for s in ("fcfs", "vtc") if args.only in (None, s)}
    if len(rows) < 2:
        return
    print(f"\n{'scheduler':10s}{'sat req/s':>10s}{'B alone p50/p99':>18s}{'B flood p50/p99':>18s}{'B 429':>7s}"
          f"{'A 200/429':>12s}{'total ok/s':>11s}")
    for name, r in rows.items():
        print(f"{name:10s}{r['saturation_rps']:10.1f}{r['b_alone_p50_ms']:8.0f} /{r['b_alone_p99_ms']:6.0f} ms"
              f"{r['b_flood_p50_ms']:8.0f} /{r['b_flood_p99_ms']:6.0f} ms{r['b_flood_statuses'].get(429, 0):7d}"
              f"{r['a_flood_statuses'].get(200, 0):6d}/{r['a_flood_statuses'].get(429, 0):<6d}{r['total_ok_rps']:10.1f}")
    v, f = rows["vtc"], rows["fcfs"]
    print(json.dumps({"vtc_b_p99_flood_vs_alone": round(v["b_p99_flood_vs_alone"], 3),
                      "fcfs_b_p99_flood_vs_alone": round(f["b_p99_flood_vs_alone"], 3),
                      "vtc_b_refused": v["b_flood_statuses"].get(429, 0), "fcfs_b_refused": f["b_flood_statuses"].get(429, 0),
                      "vtc_throughput_vs_fcfs": round(v["total_ok_rps"] / f["total_ok_rps"], 3)}))


if __name__ == "__main__":
    main()
