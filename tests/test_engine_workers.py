"""The engine in worker processes (ProcessEngine) against the same engine in this process.

Oracle: an in-process `Engine` on the same weights computes every batch; a worker must return the same
logits (same code, same fp32 arithmetic). Process-level behaviour is tested for real: workers are
`python -m switchboard.server.runtime.engine_worker` processes that a test SIGKILLs or starves.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from switchboard.adapter_store.formats import native
from switchboard.server.core.engine import CapacityError, Engine
from switchboard.server.errors import EngineUnavailable
from switchboard.server.metrics import Metrics
from switchboard.server.runtime.engine_protocol import Message, decode, encode
from switchboard.server.runtime.process_engine import ProcessEngine
from tests.factories import TEXTS, random_adapter


class Blobs(dict):
    """The store's read_blob: content hash → native file."""

    def __call__(self, sha: str) -> bytes:
        return self[sha]


def start_engine(tiny_dir, blobs: Blobs, metrics: Metrics | None = None, **kw) -> ProcessEngine:
    path, backbone = tiny_dir
    engine = ProcessEngine(str(path), blobs, metrics or Metrics(), max_length=backbone.spec.max_length, **kw)
    engine.start(backbone)
    return engine


def load(engine, adapter, blobs: Blobs | None = None):
    sha = adapter.content_hash()
    if blobs is not None:
        blobs[sha] = native.dumps(adapter, engine.spec.fingerprint)
    return engine.load(adapter, sha256=sha).slot


def batch(engine, slots: list[int]):
    enc = engine.backbone.tokenizer(TEXTS[: len(slots)], padding=True, truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor(slots)


def test_frames_round_trip_arrays_without_pickle():
    arrays = {"a": torch.arange(12).reshape(3, 4).numpy(), "b": torch.randn(2, 5).numpy(),
              "empty": torch.zeros(0, 3).numpy()}
    frame = b"".join(bytes(b) for b in encode(Message("forward", {"task": 3}, arrays)))[8:]
    back = decode(frame)
    assert back.op == "forward" and back.fields == {"task": 3}
    for name, a in arrays.items():
        assert back.arrays[name].dtype == a.dtype and (back.arrays[name] == a).all()


@pytest.fixture(scope="module")
def shared(tiny_dir):
    """Two single-thread workers, shared by the tests that leave it as they found it."""
    blobs = Blobs()
    engine = start_engine(tiny_dir, blobs, workers=2, threads=1)
    yield engine, blobs
    engine.stop()


def test_workers_compute_what_the_in_process_engine_computes(tiny_dir, shared):
    engine, blobs = shared
    oracle = Engine(tiny_dir[1])
    kinds = [dict(kind="ia3"), dict(kind="houlsby", width=4), dict(kind="mixed", pooling="mean", hidden=True),
             dict(kind="houlsby", activation="relu", num_labels=5)]
    adapters = [random_adapter(engine.spec, seed=10 + i, **kw) for i, kw in enumerate(kinds)]
    slots = [load(engine, a, blobs) for a in adapters]
    oracle_slots = [oracle.load(a).slot for a in adapters]
    order = [0, 2, 1, 3, 2, 0, 3, 1]
    ids, mask, _ = batch(engine, order)
    expected = oracle.forward(ids, mask, torch.tensor([oracle_slots[i] for i in order]))
    for _ in range(4):  # every worker gets a turn
        got = engine.forward(ids, mask, torch.tensor([slots[i] for i in order]))
        assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
        finite = torch.isfinite(expected)
        assert (got[finite] - expected[finite]).abs().max().item() <= 1e-5
    assert engine.resident_tasks == 4 and engine.resident_bytes == sum(oracle.task_bytes(a) for a in adapters)
    for slot in slots:
        engine.unload(slot)


def test_a_slot_reused_after_unload_serves_the_new_adapter_at_once(tiny_dir, shared):
    """Loads and unloads travel on the batches' socket: the next batch sees them, no acknowledgement."""
    engine, blobs = shared
    oracle = Engine(tiny_dir[1])
    for seed in range(4):
        adapter = random_adapter(engine.spec, seed=200 + seed, kind=["ia3", "houlsby"][seed % 2])
        slot = load(engine, adapter, blobs)
        ids, mask, _ = batch(engine, [slot, slot])
        expected = oracle.forward(ids, mask, torch.full((2,), oracle.load(adapter).slot))
        for _ in range(2):
            assert torch.allclose(engine.forward(ids, mask, torch.full((2,), slot)), expected, atol=1e-5)
        engine.unload(slot)
        oracle.unload(1)
    assert engine.resident_tasks == 0 and engine.pool_count == 0


def test_budget_is_kept_in_the_front(tiny_dir, shared):
    engine, blobs = shared
    adapter = random_adapter(tiny_dir[1].spec, seed=1, kind="houlsby")
    budget, engine.max_adapter_bytes = engine.max_adapter_bytes, Engine(tiny_dir[1]).task_bytes(adapter)
    try:
        slot = load(engine, adapter, blobs)
        with pytest.raises(CapacityError):
            load(engine, random_adapter(tiny_dir[1].spec, seed=2, kind="houlsby"), blobs)
        engine.unload(slot)
    finally:
        engine.max_adapter_bytes = budget


def test_stopping_the_engine_ends_its_workers(shared):
    """Last of the tests on the shared engine: it stops it."""
    engine, _ = shared
    pids = engine.worker_pids()
    engine.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow  # 16 s of worker restarts: in `pytest -m slow` (CI runs it)
def test_a_killed_or_hung_worker_fails_its_batch_with_503_then_comes_back_with_every_task(tiny_dir):
    blobs = Blobs()
    metrics = Metrics()
    path, backbone = tiny_dir
    engine = start_engine(tiny_dir, blobs, metrics, threads=1)
    oracle = Engine(backbone)
    try:
        adapters = [random_adapter(engine.spec, seed=300 + i, kind=k) for i, k in enumerate(["ia3", "houlsby"])]
        slots = [load(engine, a, blobs) for a in adapters]
        oracle_slots = [oracle.load(a).slot for a in adapters]
        # a batch long enough to be in flight when the worker is killed
        big = torch.randint(1000, 2000, (4096, 128))
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                engine.forward(big, torch.ones_like(big), torch.full((4096,), slots[0]))
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        pid = engine.worker_pids()[0]
        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        thread.join(60)
        assert not thread.is_alive(), "the batch hung on a dead worker"
        assert isinstance(outcome[0], EngineUnavailable) and outcome[0].status == 503
        # restarted, with both tasks replayed from the store, and answering as before
        ids, mask, _ = batch(engine, [0, 1, 1, 0])
        got = engine.forward(ids, mask, torch.tensor([slots[i] for i in (0, 1, 1, 0)]))
        expected = oracle.forward(ids, mask, torch.tensor([oracle_slots[i] for i in (0, 1, 1, 0)]))
        assert torch.allclose(got, expected, atol=1e-5)
        assert engine.worker_pids()[0] != pid
        assert metrics.engine_restarts._value.get() == 1

        # hung (alive, not answering): killed at the timeout, replaced, the next batch answered
        engine.timeout_s = 0.5
        pid = engine.worker_pids()[0]
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(EngineUnavailable, match="did not answer"):
            engine.forward(ids, mask, torch.tensor([slots[0]] * 4))
        assert time.monotonic() - start < 5
        engine.timeout_s = 60
        assert torch.allclose(engine.forward(ids, mask, torch.tensor([slots[i] for i in (0, 1, 1, 0)])), expected,
                              atol=1e-5)
        assert engine.worker_pids()[0] != pid and metrics.engine_restarts._value.get() == 2
    finally:
        engine.stop()


@pytest.mark.slow  # a subprocess server on its own: in `pytest -m slow` (CI runs it)
def test_a_server_on_two_workers_answers_like_the_oracle_and_survives_the_sigkill_of_one(tmp_path, tiny_dir,
                                                                                          adapters):
    """`switchboard serve` on the worker layout, end to end: concurrent requests over every kind of task
    equal the in-process engine computing each alone, in batches that mixed tasks; then one worker is
    SIGKILLed: requests are answered (a 503 at most for those in flight), never hang, and equal before."""

    import httpx
    import psutil

    from tests.server_fixture import classify_concurrently, metric_samples, running_server, upload

    path, backbone = tiny_dir
    oracle = Engine(backbone)
    env = {"SWITCHBOARD_ENGINE_WORKERS": "2", "SWITCHBOARD_THREADS": "1", "SWITCHBOARD_BATCH_WAIT_MS": "30"}
    requests = [(task, [TEXTS[(i + j) % len(TEXTS)] for j in range(1 + i % 3)])
                for i, task in enumerate(list(adapters) * 3)]
    with running_server(path, tmp_path / "data", env=env) as (url, proc):
        for task, adapter in adapters.items():
            assert upload(url, task, adapter, backbone.spec.fingerprint).status_code == 201

        responses = classify_concurrently(url, requests)
        samples = metric_samples(url)
        for (task, texts), r in zip(requests, responses):
            assert r.status_code == 200, r.text
            slot = oracle.load(adapters[task]).slot
            enc = oracle.tokenize(texts)
            want = oracle.forward(enc["input_ids"], enc["attention_mask"], torch.full((len(texts),), slot))
            oracle.unload(slot)
            for row, preds in enumerate(r.json()["predictions"]):
                for p in preds:
                    assert abs(p["score"] - want[row, adapters[task].labels.index(p["label"])].item()) <= 1e-4
        mixed = samples["switchboard_batch_tasks_count"] - samples['switchboard_batch_tasks_bucket{"le": "1.0"}']
        assert mixed >= 1, "no batch mixed tasks"

        body = {"task": "task-0", "inputs": TEXTS[:4], "raw_scores": True}
        before = httpx.post(f"{url}/v1/classify", json=body).json()
        workers = [p for p in psutil.Process(proc.pid).children() if "engine_worker" in " ".join(p.cmdline())]
        assert len(workers) == 2
        workers[0].kill()
        statuses = []
        with httpx.Client(timeout=30) as client:
            for _ in range(20):
                r = client.post(f"{url}/v1/classify", json=body)
                statuses.append(r.status_code)
                if r.status_code == 200:
                    assert r.json() == before
                else:
                    assert r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable"
        assert statuses.count(200) >= 18
        live = [p for p in psutil.Process(proc.pid).children() if "engine_worker" in " ".join(p.cmdline())]
        assert len(live) == 2 and workers[0].pid not in {p.pid for p in live}
        assert metric_samples(url)["switchboard_engine_worker_restarts_total"] == 1


def test_a_worker_that_loads_another_backbone_is_refused(tiny_dir, tmp_path):
    """The worker reports what it loaded; the front serves only its own weights."""
    from tests.factories import tiny_backbone

    other = tiny_backbone(seed=99)
    other.model.save_pretrained(tmp_path)
    other.tokenizer.save_pretrained(tmp_path)
    engine = ProcessEngine(str(tmp_path), Blobs(), Metrics(), max_length=128, threads=1)
    with pytest.raises(RuntimeError, match="loaded backbone"):
        engine.start(tiny_dir[1])


