"""What do API keys cost? Classify throughput in auth mode vs open mode, side by side in one run.

Two servers start at once on the same data (real MiniLM, 10 (IA)³ tasks, one short Debian description
per request): one in open mode, one with an admin key and the load sent with a tenant's classify key.
Rounds alternate A B B A … (closed loop, 32 clients), so drift on this machine hits both alike;
reported: each mode's mean answered req/s and their ratio.

    python -m bench.auth_cost --quick
    python -m bench.auth_cost
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import httpx

from bench.adapters import bench_adapter
from bench.serve import closed_loop
from bench.texts import sample_texts
from switchboard.adapter_store.formats import native
from switchboard.clients.local_server import free_port, running_process
from switchboard.server.core.backbone import load_backbone

ADMIN = "auth-cost-bench-admin-key-0123456789abcdef"
TASKS = [f"task-{i}" for i in range(10)]


def start(stack: ExitStack, auth: bool) -> tuple[str, dict[str, str]]:
    """A server process; returns its URL and the headers its load is sent with."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    cmd = [sys.executable, "-m", "switchboard.clients.cli", "serve", "--port", str(port), "--data-dir", str(data),
           "--log-level", "warning", "--max-length", "128"]
    env = {"SWITCHBOARD_ADMIN_KEY": ADMIN} if auth else {}
    stack.enter_context(running_process(cmd, url, data / "server.log", env=env))
    manage = {"Authorization": f"Bearer {ADMIN}"} if auth else {}
    if auth:
        created = httpx.post(f"{url}/v1/keys", headers=manage, json={"tenant": "acme", "scopes": ["classify", "manage"]})
        manage = {"Authorization": f"Bearer {created.raise_for_status().json()['key']}"}
    fp = httpx.get(f"{url}/v1/backbone", headers=manage).json()["fingerprint"]
    spec = load_backbone().spec
    for i, task in enumerate(TASKS):
        blob = native.dumps(bench_adapter(spec, "ia3", seed=i), fp)
        httpx.put(f"{url}/v1/tasks/{task}", headers=manage, files=[("files", ("a.safetensors", blob))],
                  timeout=60).raise_for_status()
    if not auth:
        return url, {}
    created = httpx.post(f"{url}/v1/keys", headers={"Authorization": f"Bearer {ADMIN}"},
                         json={"tenant": "acme", "scopes": ["classify"]})
    return url, {"Authorization": f"Bearer {created.raise_for_status().json()['key']}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="measurements per mode")
    parser.add_argument("--duration", type=float, default=None, help="seconds per measurement")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 4)
    duration = args.duration or (10.0 if args.quick else 20.0)
    texts = sample_texts(2000, seed=5)
    results: dict[str, list[float]] = {"open": [], "auth": []}
    with ExitStack() as stack:
        servers = {"open": start(stack, auth=False), "auth": start(stack, auth=True)}
        for mode, (url, headers) in servers.items():  # warm-up, not counted
            asyncio.run(closed_loop(url, TASKS, texts, 32, 5.0, headers=headers))
        order = [m for i in range(rounds) for m in (("open", "auth") if i % 2 == 0 else ("auth", "open"))]
        for mode in order:
            url, headers = servers[mode]
            run = asyncio.run(closed_loop(url, TASKS, texts, 32, duration, headers=headers))
            if run["errors"]:
                raise SystemExit(f"{mode}: {run['errors']} failed requests")
            results[mode].append(run["rps"])
            print(json.dumps({"mode": mode, "rps": round(run["rps"], 2), "refused": run["refused"]}), flush=True)
    open_rps, auth_rps = statistics.mean(results["open"]), statistics.mean(results["auth"])
    print(json.dumps({"open_rps": round(open_rps, 2), "auth_rps": round(auth_rps, 2),
                      "auth_vs_open": round(auth_rps / open_rps, 3), "rounds": rounds, "duration_s": duration}))


if __name__ == "__main__":
    main()
