"""Soak: N minutes of mixed load against one real server, with hostile requests mixed in.

Real MiniLM on loopback. At the same time: classify traffic (open loop at ~half of saturation, every
answer checked against the same adapter computed in this process), uploads of new versions,
rollbacks, deletes and re-creations, few-shot training jobs (some cancelled), and hostile requests (a
regex bomb, 20,000 labels, a 20 MiB label, an adapter that pads past the per-task limit, one larger
than the slot budget, a 1 MB task name, oversized training jobs, NaN and 2^80 fields). Reports 5xx,
wrong answers, statuses of the hostile requests, the slowest /health, and the RSS slope.

    python -m bench.soak --minutes 2     # quick
    python -m bench.soak --minutes 10
    python -m bench.soak --phases flood,connections   # issue 20's phases alone (below)

Two more phases (issue 20), each against a fresh server on the defaults (real MiniLM, its full 512
tokens, the default layout and precision), in auth mode with tenants A and B:
- flood: B sends one short text per classify request (open loop, 4 req/s) alone, then while A sends
  requests at every per-request maximum (64 texts of 3,000 characters: 64 × 512 tokens) to /v1/embed
  at 2 concurrent and to /v1/classify at 32 concurrent, from a process of its own (closed loops; a
  429 waits its Retry-After). Reported: B's p50/p99 and refusals in each phase, p99 ÷ alone, A's
  statuses; the same with chunking off (max_chunk_tokens huge, fair_batch_ms 0) for comparison.
- connections: 3,000 connections that never send a byte (past max_connections 2,048), then 2,000
  that trickle a header byte every 0.2 s: while they are held, a new client calls /health every 50 ms
  (200 ms) — its slowest answer, how many were served — what every held connection was told, and how
  long the longest lived.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch
from safetensors.torch import save

from bench.adapters import bench_adapter
from bench.http_load import ConnectionPool
from bench.serve import closed_loop, default_server
from bench.texts import sample_texts
from switchboard.adapter_store.formats import native
from switchboard.clients.local_server import free_port, running_process
from switchboard.server.core.backbone import load_backbone
from switchboard.server.core.engine import Engine

TASKS = [f"soak-{i}" for i in range(12)]
WEIGHTS = 6  # distinct adapters; each version of each task is one of them


def hostile_requests(spec, fp: str) -> list[tuple[str, dict]]:
    """(name, httpx request kwargs) — each must be refused with a 4xx."""
    d, L = spec.hidden_size, spec.num_layers
    peft = {f"base_model.model.bert.encoder.layer.{i}.attention.self.key.ia3_l": torch.ones(d, 1) for i in range(L)}
    peft |= {"base_model.model.classifier.weight": torch.zeros(2, d), "base_model.model.classifier.bias": torch.zeros(2)}
    bomb = json.dumps({"peft_type": "IA3", "feedforward_modules": "(a|aa)*c"}).encode()
    many = bench_adapter(spec, "ia3", seed=1, num_labels=20_000)
    long_label = bench_adapter(spec, "ia3", seed=2, num_labels=2)
    long_label.labels = ["x" * (20 << 20), "y"]
    wide = 8192
    prefix = "bert.encoder.layer.0.attention.output.adapters.hub."
    hub = {prefix + "adapter_down.0.weight": torch.zeros(wide, d), prefix + "adapter_down.0.bias": torch.zeros(wide),
           prefix + "adapter_up.weight": torch.zeros(d, wide), prefix + "adapter_up.bias": torch.zeros(d)}
    hub_config = {"config": {"reduction_factor": 16, "original_ln_before": False, "original_ln_after": True,
                             "residual_before_ln": True, "non_linearity": "relu"}, "name": "hub"}
    head = {"config": {"head_type": "classification", "layers": 1, "num_labels": 2}}
    huge = bench_adapter(spec, "houlsby", seed=3, width=2048, num_labels=2)  # 75 MiB: over a 64 MiB slot budget
    texts = [{"text": " ".join(["word"] * 300), "label": str(i % 4)} for i in range(4000)]
    put = lambda name, files, **kw: (name, {"method": "PUT", "url": "/v1/tasks/hostile", "files": files, **kw})  # noqa: E731
    return [
        put("regex bomb", [("files", ("adapter_config.json", bomb)), ("files", ("adapter_model.safetensors", save(peft)))]),
        put("20,000 labels", [("files", ("a.safetensors", native.dumps(many, fp)))]),
        put("20 MiB label", [("files", ("a.safetensors", native.dumps(long_label, fp)))]),
        put("pads past the limit", [("files", ("adapter_config.json", json.dumps(hub_config).encode())),
                                    ("files", ("adapter.safetensors", save(hub))),
                                    ("files", ("head_config.json", json.dumps(head).encode())),
                                    ("files", ("model_head.safetensors", save({"heads.hub.1.weight": torch.zeros(2, d),
                                                                               "heads.hub.1.bias": torch.zeros(2)})))]),
        put("over the slot budget", [("files", ("a.safetensors", native.dumps(huge, fp)))]),
        ("1 MB task name", {"method": "POST", "url": "/v1/classify", "json": {"task": "t" * 1_000_000, "inputs": "x"}}),
        ("batch 256 job", {"method": "POST", "url": "/v1/tasks/hostile/train", "json": {"examples": texts,
                                                                                        "batch_size": 256}}),
        ("token budget job", {"method": "POST", "url": "/v1/tasks/hostile/train",
                              "json": {"examples": texts, "batch_size": 64, "steps": 2000}}),
        ("seed 2^80", {"method": "POST", "url": "/v1/tasks/hostile/train",
                       "json": {"examples": texts[:2], "seed": 2**80}}),
        ("NaN lr", {"method": "POST", "url": "/v1/tasks/hostile/train", "headers": {"content-type": "application/json"},
                    "content": b'{"examples": [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], "lr": NaN}'}),
        ("top_k 2^80", {"method": "POST", "url": "/v1/classify", "json": {"task": TASKS[0], "inputs": "x",
                                                                          "top_k": 2**80}}),
    ]


class Ledger:
    """Which adapter each (task, version) holds, as acknowledged by the server."""

    def __init__(self) -> None:
        self.weights: dict[tuple[str, int], int] = {}
        self.lock = threading.Lock()

    def record(self, task: str, version: int, weights: int) -> None:
        with self.lock:
            self.weights[(task, version)] = weights

    def lookup(self, task: str, version: int) -> int | None:
        with self.lock:
            return self.weights.get((task, version))


ADMIN = "soak-bench-admin-key-0123456789abcdefghijkl"
CHUNKING_OFF = {"SWITCHBOARD_MAX_CHUNK_TOKENS": str(1 << 30), "SWITCHBOARD_FAIR_BATCH_MS": "0"}


async def max_size_closed_loop(url: str, path: str, body: dict, concurrency: int, duration: float,
                               headers: dict[str, str]) -> dict:
    """`concurrency` clients sending `body` back to back; a 429 waits its Retry-After (at most 1 s)."""
    statuses: collections.Counter[int] = collections.Counter()
    stop = time.monotonic() + duration
    pool = ConnectionPool(url, concurrency, headers)

    async def client() -> None:
        while time.monotonic() < stop:
            try:
                status, _ = await pool.post_json(path, body)
            except (OSError, asyncio.IncompleteReadError):
                status = -1
            statuses[status] += 1
            if status == 429:
                await asyncio.sleep(1.0)

    await asyncio.gather(*[client() for _ in range(concurrency)])
    await pool.close()
    return dict(statuses)


def flooder(url: str, path: str, body: dict, concurrency: int, duration: float, headers: dict[str, str]) -> dict:
    """A's closed loop in a process of its own, at nice 10: a flooding client is another program on
    another host in production, so its own CPU must not delay B's sends or the server here."""
    import os

    os.nice(10)
    return asyncio.run(max_size_closed_loop(url, path, body, concurrency, duration, headers))


def flood_vs_victim(duration: float, env: dict[str, str]) -> dict:
    import multiprocessing

    from bench.overload import long_texts, open_loop

    out: dict = {}
    with default_server({"SWITCHBOARD_ADMIN_KEY": ADMIN, **env}) as (url, _):
        admin = {"Authorization": f"Bearer {ADMIN}"}
        fp = httpx.get(f"{url}/v1/backbone", headers=admin).json()["fingerprint"]
        keys = {}
        for tenant in ("A", "B"):
            r = httpx.post(f"{url}/v1/keys", headers=admin, json={"tenant": tenant, "scopes": ["classify", "manage"]})
            keys[tenant] = {"Authorization": f"Bearer {r.json()['key']}"}
            blob = native.dumps(bench_adapter(load_backbone().spec, "ia3", seed=len(keys)), fp)
            httpx.put(f"{url}/v1/tasks/t", headers=keys[tenant], files=[("files", ("a.safetensors", blob))],
                      timeout=60).raise_for_status()
        short = sample_texts(200, seed=7, short=True)
        longest = long_texts(64)
        rate = 4.0
        asyncio.run(open_loop(url, ["t"], short, rate, 3.0, seed=0, headers=keys["B"]))  # warm-up
        alone = asyncio.run(open_loop(url, ["t"], short, rate, duration, seed=1, headers=keys["B"]))
        out["b_alone"] = {k: alone[k] for k in ("p50_ms", "p99_ms", "statuses")}
        phases = [("embed_x2", "/v1/embed", {"inputs": longest}, 2),
                  ("classify_x32", "/v1/classify", {"task": "t", "inputs": longest}, 32)]
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.apply(abs, (1,))  # the flooding process is up before the clock starts
            for name, path, body, concurrency in phases:
                flooding = pool.apply_async(flooder, (url, path, body, concurrency, duration + 2, keys["A"]))
                time.sleep(2.0)  # A's backlog is there before B's first request
                b = asyncio.run(open_loop(url, ["t"], short, rate, duration, seed=2, headers=keys["B"]))
                a = flooding.get(timeout=duration + 300)
                out[name] = {"b_p50_ms": b["p50_ms"], "b_p99_ms": b["p99_ms"], "b_statuses": b["statuses"],
                             "b_p99_vs_alone": b["p99_ms"] / alone["p99_ms"], "a_statuses": a}
                print(json.dumps({name: out[name]}), flush=True)
                time.sleep(3.0)  # A's last requests drain
    return out


def connection_exhaustion() -> dict:
    """Idle and trickling connections past max_connections, with /health and new clients measured."""
    import socket

    out: dict = {}
    with default_server() as (url, port):
        for name, count, trickle in (("idle", 3000, False), ("slowloris", 2000, True)):
            socks, refused_at_connect = [], 0
            for _ in range(count):
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                except OSError:
                    refused_at_connect += 1
                    continue
                sock.setblocking(False)
                socks.append((sock, time.monotonic()))
                if trickle:
                    try:
                        sock.send(b"GET /health HTTP/1.1\r\n")
                    except OSError:
                        pass
            slowest, served, tried, answers = 0.0, 0, 0, collections.Counter()
            lifetimes: list[float] = []
            start = time.monotonic()
            with httpx.Client(timeout=10) as client:
                while time.monotonic() - start < 15 and len(lifetimes) < len(socks):
                    t = time.monotonic()
                    try:
                        ok = client.get(f"{url}/health", headers={"connection": "close"}).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    slowest = max(slowest, time.monotonic() - t)
                    served, tried = served + ok, tried + 1
                    for sock, opened in socks:
                        if sock.fileno() < 0:
                            continue
                        try:
                            data = sock.recv(4096)
                        except BlockingIOError:
                            if trickle:
                                try:
                                    sock.send(b"x")
                                except OSError:
                                    pass
                            continue
                        except OSError:
                            data = b""
                        status = data.split(b" ")[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"
                        answers[status] += 1
                        lifetimes.append(time.monotonic() - opened)
                        sock.close()
                    time.sleep(0.2 if trickle else 0.05)
            for sock, _ in socks:
                if sock.fileno() >= 0:
                    sock.close()
            out[name] = {"connections": count, "refused_at_connect": refused_at_connect,
                         "answers": dict(answers), "still_open_after_15_s": len(socks) - len(lifetimes),
                         "longest_life_s": round(max(lifetimes, default=0.0), 2),
                         "health_slowest_s": round(slowest, 3), "new_clients_tried": tried,
                         "new_clients_served": served}
            print(json.dumps({name: out[name]}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--phases", default="soak,flood,connections",
                        help="comma-separated: soak (the mixed load above), flood, connections")
    parser.add_argument("--flood-seconds", type=float, default=30.0)
    parser.add_argument("--flood-configs", default="defaults,chunking_off",
                        help="comma-separated: defaults, chunking_off")
    parser.add_argument("--flood-env", action="append", default=[], help="KEY=VALUE settings for the flood servers")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    if "flood" in phases:
        extra = dict(kv.split("=", 1) for kv in args.flood_env)
        configs = {"defaults": extra, "chunking_off": {**extra, **CHUNKING_OFF}}
        result = {name: flood_vs_victim(args.flood_seconds, configs[name]) for name in args.flood_configs.split(",")}
        print(json.dumps({"flood_vs_victim": result}))
    if "connections" in phases:
        print(json.dumps({"connection_exhaustion": connection_exhaustion()}))
    if "soak" in phases:
        soak(args.minutes)


def soak(minutes: float) -> None:
    args = argparse.Namespace(minutes=minutes)
    duration = args.minutes * 60
    torch.set_num_threads(1)
    backbone = load_backbone(max_length=128)
    spec = backbone.spec
    adapters = [bench_adapter(spec, "houlsby" if w % 3 == 2 else "ia3", seed=w, num_labels=4) for w in range(WEIGHTS)]
    texts = sample_texts(24, seed=5)
    # the oracle: every adapter on every text, computed here with the same engine code
    engine = Engine(load_backbone(max_length=128))
    enc = engine.tokenize(texts)
    expected = {}
    for w, adapter in enumerate(adapters):
        slot = engine.load(adapter).slot
        logits = engine.forward(enc["input_ids"], enc["attention_mask"], torch.full((len(texts),), slot))
        expected.update({(w, i): logits[i, :4] for i in range(len(texts))})
    del engine

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # fp32, so every answer can be held to the fp32 oracle above at 1e-3 (precision is bench/precision.py's job)
    env = {"SWITCHBOARD_MAX_ADAPTER_BYTES": str(64 << 20), "SWITCHBOARD_MAX_TASK_BYTES": str(96 << 20),
           "SWITCHBOARD_MAX_TRAIN_STEPS": "200", "SWITCHBOARD_DTYPE": "fp32"}
    counts: collections.Counter[str] = collections.Counter()
    hostile_statuses: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    wrong: list[str] = []
    rss: list[tuple[float, float]] = []
    slowest_health = 0.0
    ledger = Ledger()
    with tempfile.TemporaryDirectory() as data:
        cmd = [sys.executable, "-m", "switchboard.clients.cli", "serve", "--port", str(port), "--data-dir", data,
               "--log-level", "warning", "--max-length", "128"]
        with running_process(cmd, url, Path(data) / "server.log", env=env) as (proc, _):
            server = psutil.Process(proc.pid)
            fp = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
            blobs = [native.dumps(a, fp) for a in adapters]
            hostile = hostile_requests(spec, fp)
            with httpx.Client(base_url=url, timeout=120) as client:
                for i, task in enumerate(TASKS):
                    r = client.put(f"/v1/tasks/{task}", files=[("files", ("a.safetensors", blobs[i % WEIGHTS]))])
                    ledger.record(task, r.json()["version"], i % WEIGHTS)
            sat = asyncio.run(closed_loop(url, TASKS, texts, 16, 10.0))["rps"]
            rate = 0.5 * sat
            print(f"saturation {sat:.1f} req/s; soaking {args.minutes:g} min at {rate:.1f} req/s", flush=True)
            stop = time.monotonic() + duration
            rng = random.Random(0)

            def manage() -> None:
                with httpx.Client(base_url=url, timeout=120) as client:
                    n = 0
                    while time.monotonic() < stop:
                        n += 1
                        task = rng.choice(TASKS)
                        try:
                            if n % 10 == 0:  # delete and re-create
                                counts[f"delete {client.delete(f'/v1/tasks/{task}').status_code}"] += 1
                            if n % 3 == 0 and n % 10:
                                versions = [v["version"] for v in client.get(f"/v1/tasks/{task}").json()["versions"]]
                                r = client.post(f"/v1/tasks/{task}/rollback", json={"version": rng.choice(versions)})
                                counts[f"rollback {r.status_code}"] += 1
                            else:
                                w = rng.randrange(WEIGHTS)
                                r = client.put(f"/v1/tasks/{task}", files=[("files", ("a.safetensors", blobs[w]))])
                                counts[f"upload {r.status_code}"] += 1
                                if r.status_code == 201:
                                    ledger.record(task, r.json()["version"], w)
                            if n % 60 == 0:  # a few-shot job; every other one cancelled
                                ex = [{"text": t, "label": str(i % 2)} for i, t in enumerate(texts)]
                                r = client.post("/v1/tasks/soak-job/train", json={"examples": ex, "steps": 20})
                                counts[f"job {r.status_code}"] += 1
                                if r.status_code == 202 and n % 120 == 0:
                                    client.delete(f"/v1/jobs/{r.json()['id']}")
                            if n % 2 == 0:
                                name, request = hostile[(n // 2) % len(hostile)]
                                method, path = request["method"], request["url"]
                                extra = {k: v for k, v in request.items() if k not in ("method", "url")}
                                hostile_statuses[name][client.request(method, path, **extra).status_code] += 1
                        except httpx.HTTPError as exc:
                            counts[f"management transport error {type(exc).__name__}"] += 1
                        time.sleep(0.3)

            def monitor() -> None:
                nonlocal slowest_health
                with httpx.Client(base_url=url, timeout=10) as client:
                    t0 = time.monotonic()
                    while time.monotonic() < stop:
                        start = time.monotonic()
                        status = client.get("/health").status_code
                        slowest_health = max(slowest_health, time.monotonic() - start)
                        counts[f"health {status}"] += 1
                        rss.append((time.monotonic() - t0, server.memory_info().rss / 2**20))
                        time.sleep(2.0)

            async def classify_load() -> None:
                pool = ConnectionPool(url, 128)
                arrivals = np.cumsum(np.random.default_rng(1).exponential(1 / rate, int(rate * duration * 1.2) + 10))
                t0 = time.monotonic()

                async def one(i: int, at: float) -> None:
                    await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
                    task, t = TASKS[i % len(TASKS)], i % len(texts)
                    try:
                        status, body = await pool.post_json("/v1/classify", {"task": task, "inputs": texts[t],
                                                                             "raw_scores": True})
                    except (OSError, asyncio.IncompleteReadError):
                        counts["classify transport error"] += 1
                        return
                    counts[f"classify {status}"] += 1
                    if status != 200:
                        return
                    answer = json.loads(body)
                    w = ledger.lookup(task, answer["version"])
                    if w is None:
                        wrong.append(f"{task} v{answer['version']}: unknown version")
                        return
                    got = {p["label"]: p["score"] for p in answer["predictions"][0]}
                    want = expected[(w, t)]
                    diff = max(abs(got[adapters[w].labels[c]] - float(want[c])) for c in range(4))
                    if diff > 1e-3:
                        wrong.append(f"{task} v{answer['version']} text {t}: |Δ| {diff:.2e}")

                await asyncio.gather(*[one(i, float(at)) for i, at in enumerate(arrivals) if at < duration])
                await pool.close()

            threads = [threading.Thread(target=manage), threading.Thread(target=monitor)]
            for thread in threads:
                thread.start()
            asyncio.run(classify_load())
            for thread in threads:
                thread.join()
    later = [(t, m) for t, m in rss if t > 60] or rss
    slope = float(np.polyfit([t for t, _ in later], [m for _, m in later], 1)[0]) * 60 if len(later) > 2 else 0.0
    five_xx = sum(n for key, n in counts.items() if key.split()[-1].startswith("5"))
    five_xx += sum(n for statuses in hostile_statuses.values() for code, n in statuses.items()
                   if code >= 500 and code != 507)
    # 507 insufficient_capacity is the contract's refusal of an adapter larger than the slot budget
    hostile_ok = all(all(400 <= code < 500 or code == 507 for code in statuses) for statuses in hostile_statuses.values())
    print(f"\ncounts: {dict(sorted(counts.items()))}")
    print(f"hostile: { {k: dict(v) for k, v in hostile_statuses.items()} }")
    print(f"wrong answers: {len(wrong)} {wrong[:5]}")
    per_minute = {int(t // 60): round(m) for t, m in rss}
    print(f"RSS by minute (MiB): {per_minute}")
    print(json.dumps({"minutes": args.minutes, "classify_ok": counts["classify 200"], "five_xx": five_xx,
                      "wrong_answers": len(wrong), "hostile_all_4xx": hostile_ok,
                      "hostile_requests": sum(sum(v.values()) for v in hostile_statuses.values()),
                      "slowest_health_s": round(slowest_health, 3), "rss_start_mib": round(rss[0][1], 1),
                      "rss_end_mib": round(rss[-1][1], 1), "rss_slope_mib_per_min": round(slope, 2)}))


if __name__ == "__main__":
    main()
