"""Memory and speed after churn: 1,000 upload/classify/delete cycles, each adapter of a shape never
seen before (label count 2–1,001; Houlsby widths 4–67 every fourth cycle), on real MiniLM.

Before and after the churn, side by side in one run: the server's RSS, its slot-pool count, and the
closed-loop throughput of one resident task (so "forward speed unchanged" is measured, not assumed).
Each distinct shape used to leave a slot pool behind forever (RSS 733 → 3,158 MiB, gathering
0.03 → 4.6 ms per chunk).

    python -m bench.churn --quick     # 300 cycles
    python -m bench.churn
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import httpx
import psutil

from bench.adapters import bench_adapter
from bench.serve import closed_loop
from bench.texts import sample_texts
from switchboard.adapter_store.formats import native
from switchboard.clients.local_server import free_port, running_process
from switchboard.server.core.backbone import load_backbone


def gauge(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cycles", type=int, default=None)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per throughput measurement")
    args = parser.parse_args()
    cycles = args.cycles or (300 if args.quick else 1000)
    spec = load_backbone().spec
    texts = sample_texts(400, seed=3)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        cmd = [sys.executable, "-m", "switchboard.clients.cli", "serve", "--port", str(port), "--data-dir", data,
               "--log-level", "warning", "--max-length", "128"]
        with running_process(cmd, url, Path(data) / "server.log") as (proc, _):
            server = psutil.Process(proc.pid)
            fp = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
            with httpx.Client(timeout=60) as client:
                client.put(f"{url}/v1/tasks/steady", files=[("files", ("a.safetensors", native.dumps(
                    bench_adapter(spec, "ia3", seed=0), fp)))]).raise_for_status()

                def churn(n: int, offset: int) -> None:
                    for i in range(offset, offset + n):
                        kind = "houlsby" if i % 4 == 3 else "ia3"
                        adapter = bench_adapter(spec, kind, seed=i, width=4 + i % 64, num_labels=2 + i % 1000)
                        blob = native.dumps(adapter, fp)
                        client.put(f"{url}/v1/tasks/churn", files=[("files", ("a.safetensors", blob))]).raise_for_status()
                        assert client.post(f"{url}/v1/classify", json={"task": "churn", "inputs": texts[i % 400]}
                                           ).status_code == 200
                        client.delete(f"{url}/v1/tasks/churn").raise_for_status()

                churn(50, 10_000)  # warm-up: allocator arenas, caches
                asyncio.run(closed_loop(url, ["steady"], texts, 16, 5.0))
                before = {"rss_mib": server.memory_info().rss / 2**20, "pools": gauge(url, "switchboard_slot_pools"),
                          "rps": asyncio.run(closed_loop(url, ["steady"], texts, 16, args.duration))["rps"]}
                print(f"before: {before}", flush=True)
                churn(cycles, 0)
                after = {"rss_mib": server.memory_info().rss / 2**20, "pools": gauge(url, "switchboard_slot_pools"),
                         "rps": asyncio.run(closed_loop(url, ["steady"], texts, 16, args.duration))["rps"]}
                print(f"after {cycles} cycles: {after}", flush=True)
    print(json.dumps({"cycles": cycles, "rss_before_mib": round(before["rss_mib"], 1),
                      "rss_after_mib": round(after["rss_mib"], 1),
                      "rss_growth_mib": round(after["rss_mib"] - before["rss_mib"], 1),
                      "pools_before": before["pools"], "pools_after": after["pools"],
                      "rps_before": round(before["rps"], 2), "rps_after": round(after["rps"], 2),
                      "speed_after_vs_before": round(after["rps"] / before["rps"], 3)}))


if __name__ == "__main__":
    main()
