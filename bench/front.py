"""The front alone: CPU per one-text classify and requests/s with 1 and 2 fronts, against an engine
that answers at once (`InstantEngine`, bench-only: the real engine's slot books, a forward pass that
returns zeros), so nothing but HTTP, auth, validation, tokenization, scheduling and JSON is measured.

Load comes from `wrk` (a compiled load generator, Debian's package) with a Lua script that sends
one real text (Debian package synopses and descriptions) per request over keep-alive connections,
rotating over the tasks. CPU is every server process's user + system time (psutil) over the run,
divided by the requests answered; wrk's own CPU is reported beside it (it shares the cores).

    python -m bench.front                      # fronts 1 and 2, 15 s each
    python -m bench.front --quick              # 5 s each
    python -m bench.front --fronts 1,2,3 --connections 64 --seconds 20
    python -m bench.front --engine real        # the same load on `switchboard serve` (MiniLM, engine workers)
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import torch

from bench.adapters import PEFT_BERT_SITES, bench_adapter
from bench.texts import sample_texts
from switchboard.adapter_store.formats import native
from switchboard.clients.local_server import free_port, running_process
from switchboard.server.core.backbone import Backbone, load_backbone
from switchboard.server.core.engine import Engine
from switchboard.server.settings import Settings


class InstantEngine(Engine):
    """Bench-only stand-in: loads and books tasks like the engine, answers every batch at once."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_slots: torch.Tensor) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], self.spec.hidden_size)

    def warm_up(self, rows: int = 8, length: int = 64) -> tuple[int, float]:
        return rows * length, 1e-4


def instant_engine(backbone: Backbone, settings: Settings) -> Engine:
    return InstantEngine(backbone, max_adapter_bytes=settings.max_adapter_bytes)


def serve_instant(port: int, fronts: int, data_dir: str) -> int:
    """`switchboard serve` on the defaults, with the instant engine (the bench runs this in a subprocess)."""
    from switchboard.server.http.fronts import run_server
    from switchboard.server.log_config import configure_logging, logging_config

    settings = Settings(port=port, fronts=fronts, data_dir=Path(data_dir), log_level="warning")
    configure_logging(settings.log_level, settings.log_format)
    error = run_server(settings, logging_config(settings.log_level, settings.log_format), engine_factory=instant_engine)
    return 1 if error else 0


LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format(nil, "/v1/classify", nil, bodies[(i %% #bodies) + 1])
end
"""


def lua_script(tasks: list[str], texts: list[str]) -> str:
    bodies = [json.dumps({"task": tasks[i % len(tasks)], "inputs": text}) for i, text in enumerate(texts)]
    return LUA % ",".join("[==[" + b + "]==]" for b in bodies)


def process_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_config(fronts: int, seconds: float, connections: int, texts: list[str], n_tasks: int,
               engine: str = "instant") -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        cmd = [sys.executable, "-m", "bench.front", "--serve-instant", str(port), "--fronts", str(fronts),
               "--data-dir", data]
        if engine == "real":  # the server as shipped: MiniLM in the engine workers
            cmd = [sys.executable, "-m", "switchboard.clients.cli", "serve", "--port", str(port), "--fronts",
                   str(fronts), "--data-dir", data, "--log-level", "warning"]
        with running_process(cmd, url, Path(data) / "server.log") as (proc, _):
            fingerprint = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
            backbone_spec = load_backbone().spec
            tasks = [f"task-{i}" for i in range(n_tasks)]
            with httpx.Client(timeout=60) as client:
                for i, task in enumerate(tasks):
                    blob = native.dumps(bench_adapter(backbone_spec, "ia3", seed=i, sites=PEFT_BERT_SITES), fingerprint)
                    client.put(f"{url}/v1/tasks/{task}", files=[("files", ("a.safetensors", blob))]).raise_for_status()
            deadline = time.monotonic() + 60  # every front connected (each answers /v1/backbone)
            seen: set[str] = set()
            while len(seen) < fronts and fronts > 1:
                assert time.monotonic() < deadline, "a front never came up"
                with httpx.Client() as c:
                    seen.add(c.get(f"{url}/v1/backbone").headers.get("x-switchboard-front", "0"))
            script = Path(data) / "post.lua"
            script.write_text(lua_script(tasks, texts))
            pids = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
            # warm-up (connections, caches), not measured
            subprocess.run(["wrk", "-t2", f"-c{connections}", "-d2s", "-s", str(script), url], capture_output=True)
            cpu0, child0 = process_cpu(pids), resource.getrusage(resource.RUSAGE_CHILDREN)
            out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script),
                                  url], capture_output=True, text=True, check=True).stdout
            cpu1, child1 = process_cpu(pids), resource.getrusage(resource.RUSAGE_CHILDREN)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {p: _ms(re.search(rf"\s{p}%\s+([\d.]+\w+)", out).group(1)) for p in ("50", "99")}
    wrk_cpu = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
    return {"fronts": fronts, "requests": requests, "non_2xx": non2xx, "rps": rps, "p50_ms": lat["50"],
            "p99_ms": lat["99"], "server_cpu_us_per_request": 1e6 * (cpu1 - cpu0) / max(1, requests),
            "wrk_cpu_us_per_request": 1e6 * wrk_cpu / max(1, requests), "connections": connections,
            "seconds": seconds, "engine": engine}


def _ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", value).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fronts", default="1,2")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--engine", choices=["instant", "real"], default="instant",
                        help="instant: the bench's stand-in engine (the front alone); real: `switchboard serve`")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="default: bench/out/front-<engine>.json")
    parser.add_argument("--serve-instant", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_instant is not None:
        sys.exit(serve_instant(args.serve_instant, int(args.fronts), args.data_dir))
    seconds = 5.0 if args.quick else args.seconds
    texts = [t[:400] for t in sample_texts(512, seed=21)]
    rows = [run_config(int(n), seconds, args.connections, texts, args.tasks, args.engine)
            for n in args.fronts.split(",")]
    base = rows[0]
    print(f"{'fronts':>6} {'req/s':>8} {'× 1st':>6} {'server CPU µs/req':>18} {'wrk CPU µs/req':>15} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'non-2xx':>8}")
    for r in rows:
        r["rps_ratio"] = r["rps"] / base["rps"]
        print(f"{r['fronts']:>6} {r['rps']:>8.0f} {r['rps_ratio']:>6.2f} {r['server_cpu_us_per_request']:>18.0f} "
              f"{r['wrk_cpu_us_per_request']:>15.0f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['non_2xx']:>8}")
    out = Path(args.out or f"bench/out/front-{args.engine}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "cores": psutil.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
