"""Soak: N minutes of mixed load against one real server, with hostile requests mixed in.

Real MiniLM on loopback. At the same time: classify traffic (open loop at ~half of saturation, every
answer checked against the same adapter computed in this process), uploads of new versions,
rollbacks, deletes and re-creations, few-shot training jobs (some cancelled), and hostile requests (a
regex bomb, 20,000 labels, a 20 MiB label, an adapter that pads past the per-task limit, one larger
than the slot budget, a 1 MB task name, oversized training jobs, NaN and 2^80 fields). Reports 5xx,
wrong answers, statuses of the hostile requests, the slowest /health, and the RSS slope.

    python -m bench.soak --minutes 2     # quick
    python -m bench.soak --minutes 10
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
from bench.serve import closed_loop
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args()
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
