"""`switchboard serve --fronts 2`: two HTTP front processes on one port in front of one scheduler.

Every guarantee is checked through both fronts — each response names its front (X-Switchboard-Front),
and fresh connections land on either (the kernel hands each accept to one process): answers equal the
in-process engine's, management through any front is seen at once through every front, a revoked key
stops at once, /metrics counts both fronts' requests, admission's 429 carries Retry-After, a tenant
flooding through both fronts never gets another refused, and a SIGKILLed front fails only its own
requests and comes back.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import threading
import time
from contextlib import contextmanager

import httpx
import psutil
import pytest
import torch

from switchboard.server.core.engine import Engine
from tests.factories import random_adapter
from tests.server_fixture import metric_samples, running_server, upload

ADMIN = "fronts-test-admin-key-0123456789abcdef"
HEAD = {"Authorization": f"Bearer {ADMIN}"}
TEXTS = ["a chess engine", "the DNS server answers slowly", "I loved it", "terrible service, never again"]


def on_front(index: int, send, tries: int = 200, wait_s: float = 60.0) -> httpx.Response:
    """`send(client)` over fresh connections until front `index` answers it (a front that is still
    starting does not accept yet: fresh connections keep trying for up to `wait_s`)."""
    deadline = time.monotonic() + wait_s
    for attempt in itertools.count():
        with httpx.Client(timeout=30) as client:
            r = send(client)
        if r.headers.get("x-switchboard-front") == str(index):
            return r
        if attempt >= tries and time.monotonic() > deadline:
            break
        if attempt >= tries:
            time.sleep(0.1)
    raise AssertionError(f"front {index} never answered in {wait_s:g} s")


@pytest.fixture(scope="module")
def fronts_server(tiny_dir, tmp_path_factory):
    env = {"SWITCHBOARD_ADMIN_KEY": ADMIN, "SWITCHBOARD_ENGINE_WORKERS": "1", "SWITCHBOARD_THREADS": "1"}
    with running_server(tiny_dir[0], tmp_path_factory.mktemp("fronts"), env=env, extra_args=["--fronts", "2"]) as (
            url, proc):
        on_front(1, lambda c: c.get(f"{url}/v1/backbone", headers=HEAD))  # front 1 is connected
        keys = {t: {"Authorization": "Bearer " + httpx.post(f"{url}/v1/keys", headers=HEAD, json={
            "tenant": t, "scopes": ["classify", "manage"]}).json()["key"]} for t in ("a", "b")}
        yield url, proc, keys


def test_both_fronts_answer_as_the_engine_does(fronts_server, tiny_dir, adapters):
    url, _, keys = fronts_server
    backbone = tiny_dir[1]
    for task, adapter in adapters.items():
        assert upload(url, task, adapter, backbone.spec.fingerprint, headers=keys["a"]).status_code == 201
    oracle = Engine(backbone)
    for task, adapter in adapters.items():
        slot = oracle.load(adapter).slot
        enc = oracle.tokenize(TEXTS)
        want = oracle.forward(enc["input_ids"], enc["attention_mask"], torch.full((len(TEXTS),), slot))
        oracle.unload(slot)
        for front in (0, 1):
            r = on_front(front, lambda c: c.post(f"{url}/v1/classify", headers=keys["a"], json={
                "task": task, "inputs": TEXTS, "raw_scores": True}))  # noqa: B023
            assert r.status_code == 200, r.text
            for row, preds in enumerate(r.json()["predictions"]):
                got = {p["label"]: p["score"] for p in preds}
                for i, label in enumerate(adapter.labels):
                    assert abs(got[label] - float(want[row, i])) < 1e-4, (front, task, row, label)
    # a body the fast path cannot decode is worded by the route, the same on both fronts
    for front in (0, 1):
        r = on_front(front, lambda c: c.post(f"{url}/v1/classify", headers=keys["a"], json={
            "task": "task-0", "inputs": "x", "topk": 2}))
        assert r.status_code == 422 and "did you mean 'top_k'" in r.json()["error"]["message"], r.text
    # embeddings through a front
    r = on_front(1, lambda c: c.post(f"{url}/v1/embed", headers=keys["a"], json={"inputs": TEXTS}))
    assert r.status_code == 200 and len(r.json()["embeddings"]) == len(TEXTS)
    # pairs (the segment mask crosses the front link) and rerank: the same answers on both fronts
    pair_task = random_adapter(backbone.spec, seed=11, num_labels=2, pooling="pair")
    assert upload(url, "pair-task", pair_task, backbone.spec.fingerprint, headers=keys["a"]).status_code == 201
    slot = oracle.load(pair_task).slot
    pairs = [["web server", t] for t in TEXTS[:4]]
    enc = oracle.tokenize([tuple(p) for p in pairs])
    want = oracle.forward(enc["input_ids"], enc["attention_mask"], torch.full((4,), slot))
    for front in (0, 1):
        r = on_front(front, lambda c: c.post(f"{url}/v1/classify", headers=keys["a"], json={
            "task": "pair-task", "inputs": pairs, "raw_scores": True}))
        assert r.status_code == 200, r.text
        for row, preds in enumerate(r.json()["predictions"]):
            got = {p["label"]: p["score"] for p in preds}
            assert all(abs(got[label] - float(want[row, i])) < 1e-4 for i, label in enumerate(pair_task.labels))
        r = on_front(front, lambda c: c.post(f"{url}/v1/rerank", headers=keys["a"], json={
            "task": "pair-task", "query": "web server", "documents": TEXTS[:4], "raw_scores": True}))
        assert r.status_code == 200, r.text
        margins = (want[:, 1] - want[:, 0]).tolist()
        assert [x["index"] for x in r.json()["results"]] == sorted(range(4), key=lambda i: -margins[i])


@contextmanager
def client_on(url: str, index: int, tries: int = 200):
    """An httpx.Client whose (kept-alive) connection was accepted by front `index`."""
    for _ in range(tries):
        client = httpx.Client(timeout=30)
        if client.get(f"{url}/v1/backbone", headers=HEAD).headers.get("x-switchboard-front") == str(index):
            try:
                yield client
            finally:
                client.close()
            return
        client.close()
    raise AssertionError(f"front {index} never answered in {tries} fresh connections")


def test_changes_through_any_front_are_seen_at_once_by_every_front(fronts_server, tiny_dir):
    url, _, keys = fronts_server
    spec = tiny_dir[1].spec
    for version in (1, 2):  # each upload through front 1, then at once a classify through each front
        with client_on(url, 1) as c:
            r = upload_with(c, url, "swap", random_adapter(spec, seed=40 + version), spec.fingerprint, keys["b"])
        assert r.status_code == 201 and r.headers["x-switchboard-front"] == "1", r.text
        for front in (0, 1):
            got = on_front(front, lambda c: c.post(f"{url}/v1/classify", headers=keys["b"],
                                                   json={"task": "swap", "inputs": "x"}))
            assert got.json()["version"] == version
    with client_on(url, 1) as c:
        r = c.post(f"{url}/v1/tasks/swap/rollback", headers=keys["b"], json={"version": 1})
    assert r.status_code == 200, r.text
    for front in (0, 1):
        got = on_front(front, lambda c: c.post(f"{url}/v1/classify", headers=keys["b"], json={"task": "swap",
                                                                                              "inputs": "x"}))
        assert got.json()["version"] == 1
    with client_on(url, 1) as c:
        assert c.delete(f"{url}/v1/tasks/swap", headers=keys["b"]).status_code == 204
    for front in (0, 1):
        got = on_front(front, lambda c: c.post(f"{url}/v1/classify", headers=keys["b"], json={"task": "swap",
                                                                                              "inputs": "x"}))
        assert got.status_code == 404 and got.json()["error"]["type"] == "task_not_found"
    # another tenant's task is not found through either front
    assert on_front(1, lambda c: c.post(f"{url}/v1/classify", headers=keys["b"], json={
        "task": "task-0", "inputs": "x"})).status_code == 404


def upload_with(client: httpx.Client, url: str, task: str, adapter, fingerprint: str, headers) -> httpx.Response:
    from switchboard.adapter_store.formats import native

    blob = native.dumps(adapter, fingerprint)
    return client.put(f"{url}/v1/tasks/{task}", files=[("files", ("adapter.safetensors", blob))], headers=headers)


def test_a_revoked_key_stops_at_once_on_every_front(fronts_server):
    url, _, keys = fronts_server
    created = httpx.post(f"{url}/v1/keys", headers=HEAD, json={"tenant": "a", "scopes": ["classify"]}).json()
    key = {"Authorization": f"Bearer {created['key']}"}
    for front in (0, 1):  # both fronts have checked (and front 1 cached) the key
        assert on_front(front, lambda c: c.post(f"{url}/v1/embed", headers=key, json={
            "inputs": "x"})).status_code == 200
    with client_on(url, 1) as c:
        assert c.delete(f"{url}/v1/keys/{created['id']}", headers=HEAD).status_code in (200, 204)
    for front in (0, 1):
        r = on_front(front, lambda c: c.post(f"{url}/v1/embed", headers=key, json={"inputs": "x"}))
        assert r.status_code == 401, (front, r.text)


def test_metrics_count_every_fronts_requests(fronts_server):
    url, _, keys = fronts_server
    key = 'switchboard_requests_total{"endpoint": "POST /v1/embed", "status": "200"}'
    before = metric_samples(url).get(key, 0)
    seen = set()
    for _ in range(40):
        with httpx.Client(timeout=30) as c:
            r = c.post(f"{url}/v1/embed", headers=keys["b"], json={"inputs": "x"})
        assert r.status_code == 200
        seen.add(r.headers["x-switchboard-front"])
    assert seen == {"0", "1"}
    after = metric_samples(url)
    assert after[key] - before == 40
    assert after["switchboard_front_processes"] == 1


@pytest.mark.slow
def test_flooding_tenant_through_both_fronts_never_gets_the_other_refused(fronts_server, tiny_dir):
    """A floods /v1/embed at the per-request maximum over many connections (both fronts); B's one-text
    requests, also over both fronts, are all answered; A is refused (429 + Retry-After) for its own demand."""
    url, _, keys = fronts_server
    spec = tiny_dir[1].spec
    assert upload(url, "victim", random_adapter(spec, seed=9), spec.fingerprint, headers=keys["b"]).status_code == 201
    long_text = "lorem ipsum dolor sit amet " * 110
    a_statuses: list[int] = []
    a_retry: list[str | None] = []
    b_fronts: list[str] = []
    b_statuses: list[int] = []
    b_errors: list[tuple] = []
    done = asyncio.Event()

    async def run() -> None:
        async def flooder() -> None:
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as client:
                while not done.is_set():
                    r = await client.post(f"{url}/v1/embed", headers=keys["a"], json={"inputs": [long_text] * 64})
                    a_statuses.append(r.status_code)
                    if r.status_code == 429:
                        a_retry.append(r.headers.get("retry-after"))
                        await asyncio.sleep(0.05)

        async def light() -> None:
            await asyncio.sleep(1.0)
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as client:
                for _ in range(16):
                    r = await client.post(f"{url}/v1/classify", headers=keys["b"], json={"task": "victim", "inputs": "x"})
                    b_statuses.append(r.status_code)
                    if r.status_code != 200:
                        b_errors.append((r.headers.get("x-switchboard-front"), r.text))
                    b_fronts.append(r.headers.get("x-switchboard-front", "?"))
            done.set()

        await asyncio.gather(light(), *[flooder() for _ in range(24)])

    asyncio.run(run())
    assert b_statuses == [200] * 16, b_errors
    assert set(b_fronts) == {"0", "1"}, b_fronts
    assert set(a_statuses) <= {200, 429} and 429 in a_statuses, set(a_statuses)
    assert all(r is not None and r.isdigit() for r in a_retry)


@pytest.mark.slow
def test_a_killed_front_fails_only_its_own_requests_and_comes_back(fronts_server):
    url, proc, keys = fronts_server
    fronts = [p for p in psutil.Process(proc.pid).children() if "switchboard.server.http.front" in " ".join(p.cmdline())]
    assert len(fronts) == 1
    restarts = metric_samples(url).get("switchboard_front_restarts_total", 0)
    os.kill(fronts[0].pid, signal.SIGKILL)
    # the scheduler and front 0 go on at once
    for _ in range(10):
        with httpx.Client(timeout=30) as c:
            r = c.post(f"{url}/v1/embed", headers=keys["b"], json={"inputs": "x"})
        assert r.status_code == 200
    deadline = time.monotonic() + 60
    while metric_samples(url).get("switchboard_front_restarts_total", 0) == restarts:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # and front 1 is back (a new process)
    r = on_front(1, lambda c: c.post(f"{url}/v1/embed", headers=keys["b"], json={"inputs": "x"}), tries=400)
    assert r.status_code == 200
    assert proc.poll() is None


@pytest.mark.slow
def test_through_a_front_a_departed_clients_rows_are_dropped_and_deadlines_hold(tiny_dir, tmp_path):
    """With the engine worker stopped (SIGSTOP) nothing computes: a request through front 1 whose client
    leaves is cancelled in the scheduler (dropped as client_gone, never computed), and one whose client
    waits gets 503 deadline_exceeded at its deadline, through front 1 too. Both leases are released."""
    env = {"SWITCHBOARD_ENGINE_WORKERS": "1", "SWITCHBOARD_THREADS": "1", "SWITCHBOARD_REQUEST_TIMEOUT_S": "2"}
    spec = tiny_dir[1].spec
    with running_server(tiny_dir[0], tmp_path / "data", env=env, extra_args=["--fronts", "2"]) as (url, proc):
        assert upload(url, "t", random_adapter(spec, seed=5), spec.fingerprint).status_code == 201
        on_front(1, lambda c: c.post(f"{url}/v1/classify", json={"task": "t", "inputs": "warm"}))
        worker = next(p for p in psutil.Process(proc.pid).children()
                      if "switchboard.server.runtime.engine_worker" in p.cmdline())
        before = metric_samples(url)
        worker.suspend()
        try:
            # in the forward pass the stopped worker holds (answered 503 at its deadline)
            blocker = threading.Thread(target=lambda: httpx.post(f"{url}/v1/classify", timeout=30, json={
                "task": "t", "inputs": "blocker"}))
            blocker.start()
            time.sleep(0.5)
            with client_on(url, 1) as c:  # queued behind it; the client gives up after 0.5 s and leaves
                with pytest.raises(httpx.ReadTimeout):
                    c.post(f"{url}/v1/classify", json={"task": "t", "inputs": "gone"}, timeout=0.5)
            with client_on(url, 1) as c:
                r = c.post(f"{url}/v1/classify", json={"task": "t", "inputs": "waits"}, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["type"] == "deadline_exceeded", r.text
            assert r.headers["x-switchboard-front"] == "1"
        finally:
            worker.resume()
        blocker.join()
        deadline = time.monotonic() + 30
        while True:
            after = metric_samples(url)
            gone = after.get('switchboard_dropped_requests_total{"reason": "client_gone"}', 0) - before.get(
                'switchboard_dropped_requests_total{"reason": "client_gone"}', 0)
            if gone >= 1:
                break
            assert time.monotonic() < deadline, "the departed client's request was not dropped"
            time.sleep(0.2)
        # nothing left queued, and the server still answers through both fronts
        assert after["switchboard_queue_depth_rows"] == 0
        for front in (0, 1):
            assert on_front(front, lambda c: c.post(f"{url}/v1/classify", json={"task": "t", "inputs": "x"}
                                                    )).status_code == 200
