"""Replicas on one real PostgreSQL: what one replica acknowledges, the other serves within a second
with identical logits; rollbacks, deletes and key revocations travel too; concurrent uploads of one
task get distinct numbers; a replica SIGKILLed during uploads loses nothing it acknowledged; a
PostgreSQL restart leaves resident tasks served (health "degraded", no 5xx) and the replicas
reconnect by themselves."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from switchboard.adapter_store.formats import native
from tests.factories import TEXTS, random_adapter
from tests.server_fixture import running_server, serving_in_thread

ADMIN = "replica-test-admin-key"
ROOT_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


def put(url: str, task: str, blob: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.put(f"{url}/v1/tasks/{task}", files=[("files", ("a.safetensors", blob))], headers=headers,
                     timeout=30)


def logits(url: str, task: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", json={"task": task, "inputs": TEXTS[:3], "raw_scores": True},
                      headers=headers, timeout=30)


def until(predicate, timeout: float = 1.0) -> float:
    """Seconds until `predicate()` holds; fails past `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"not within {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - start


def test_two_replicas_share_uploads_rollbacks_deletes_and_key_revocations(tiny_dir, tmp_path, pg_url):
    spec = tiny_dir[1].spec
    with serving_in_thread(tmp_path / "a", tiny_dir[1], store=pg_url, admin_key=ADMIN) as (a, state), \
            serving_in_thread(tmp_path / "b", tiny_dir[1], store=pg_url, admin_key=ADMIN) as (b, _):
        fp = state.runtime.engine.spec.fingerprint
        key = httpx.post(f"{a}/v1/keys", headers=ROOT_HEADERS, json={"tenant": "acme", "scopes": ["classify", "manage"]})
        acme = {"Authorization": f"Bearer {key.json()['key']}"}
        until(lambda: logits(b, "none", acme).status_code == 404)  # the key created on A works on B: 404, not 401

        v1, v2 = (native.dumps(random_adapter(spec, seed=s), fp) for s in (1, 2))
        assert put(a, "sentiment", v1, acme).status_code == 201
        until(lambda: logits(b, "sentiment", acme).status_code == 200)
        assert logits(b, "sentiment", acme).json() == logits(a, "sentiment", acme).json()  # identical logits
        assert put(a, "sentiment", v2, acme).json()["version"] == 2
        until(lambda: logits(b, "sentiment", acme).json()["version"] == 2)
        assert logits(b, "sentiment", acme).json() == logits(a, "sentiment", acme).json()

        rolled = httpx.post(f"{b}/v1/tasks/sentiment/rollback", json={"version": 1}, headers=acme)
        assert rolled.status_code == 200
        until(lambda: logits(a, "sentiment", acme).json()["version"] == 1)
        assert logits(a, "sentiment", acme).json() == logits(b, "sentiment", acme).json()

        with ThreadPoolExecutor(8) as pool:  # both replicas upload one task at once
            blobs = [native.dumps(random_adapter(spec, seed=10 + i), fp) for i in range(8)]
            answers = list(pool.map(lambda i: put((a, b)[i % 2], "hot", blobs[i], acme), range(8)))
        assert sorted(r.json()["version"] for r in answers) == list(range(1, 9))
        until(lambda: httpx.get(f"{a}/v1/tasks/hot", headers=acme).json()
              == httpx.get(f"{b}/v1/tasks/hot", headers=acme).json())  # the same current version, the same list

        assert httpx.delete(f"{a}/v1/tasks/sentiment", headers=acme).status_code == 204
        until(lambda: logits(b, "sentiment", acme).status_code == 404)

        key_id = key.json()["id"]
        assert httpx.delete(f"{a}/v1/keys/{key_id}", headers=ROOT_HEADERS).status_code == 204
        until(lambda: logits(b, "hot", acme).status_code == 401)


@pytest.mark.slow  # a subprocess server on its own: in `pytest -m slow` (CI runs it)
def test_a_replica_killed_during_uploads_loses_no_acknowledged_version(tiny_dir, tmp_path, pg_url):
    spec = tiny_dir[1].spec
    acknowledged: dict[tuple[str, int], str] = {}
    stop = threading.Event()
    with running_server(tiny_dir[0], tmp_path / "a", env={"SWITCHBOARD_STORE": pg_url}) as (a, proc):
        fp = httpx.get(f"{a}/v1/backbone").json()["fingerprint"]

        def uploader(worker: int) -> None:
            i = 0
            while not stop.is_set():
                task = f"crash-{worker}-{i % 3}"
                try:
                    r = put(a, task, native.dumps(random_adapter(spec, seed=1000 * worker + i, kind="ia3"), fp))
                except httpx.HTTPError:
                    return
                if r.status_code == 201:
                    acknowledged[(task, r.json()["version"])] = r.json()["sha256"]
                i += 1

        threads = [threading.Thread(target=uploader, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        os.kill(proc.pid, signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(30)
        proc.wait(10)
    assert len(acknowledged) >= 5
    with serving_in_thread(tmp_path / "b", tiny_dir[1], store=pg_url) as (b, state):
        _, versions = state.runtime.store.load_all()
        stored = {(r.task, r.version): r.sha256 for rs in versions.values() for r in rs}
        for key, sha in acknowledged.items():
            assert stored.get(key) == sha, f"acknowledged version {key} lost on the other replica"
        for task in {task for task, _ in acknowledged}:
            assert logits(b, task).status_code == 200


def test_postgres_restart_keeps_resident_tasks_served_and_replicas_reconnect(tiny_dir, tmp_path,
                                                                             fresh_pg_cluster):
    spec = tiny_dir[1].spec
    cluster = fresh_pg_cluster
    url = cluster.new_database()
    with serving_in_thread(tmp_path / "a", tiny_dir[1], store=url) as (a, state):
        fp = state.runtime.engine.spec.fingerprint
        assert put(a, "resident", native.dumps(random_adapter(spec, seed=5), fp)).status_code == 201
        before = logits(a, "resident").json()
        cluster.stop("fast")
        until(lambda: httpx.get(f"{a}/health").json()["status"] == "degraded", timeout=10)
        for _ in range(20):  # served from what the replica holds: no 5xx
            r = logits(a, "resident")
            assert r.status_code == 200 and r.json() == before
        refused = put(a, "new", native.dumps(random_adapter(spec, seed=6), fp))
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "store_unavailable"
        assert httpx.get(f"{a}/health").status_code == 200  # still in rotation: it serves
        cluster.start()
        until(lambda: httpx.get(f"{a}/health").json()["status"] == "ok", timeout=15)
        until(lambda: put(a, "new", native.dumps(random_adapter(spec, seed=6), fp)).status_code == 201,
              timeout=15)
        assert logits(a, "new").status_code == 200


@pytest.mark.slow  # a subprocess server waiting out its connect timeout: in `pytest -m slow` (CI runs it)
@pytest.mark.parametrize("bad", ["postgresql://postgres@127.0.0.1:1/none"])
def test_an_unreachable_store_at_start_is_a_clear_startup_error(tiny_dir, tmp_path, bad):
    import os
    import subprocess
    import sys

    from tests.server_fixture import ROOT, free_port

    done = subprocess.run([sys.executable, "-m", "switchboard.clients.cli", "serve", "--port", str(free_port()),
                           "--data-dir", str(tmp_path), "--model", str(tiny_dir[0]), "--store", bad,
                           "--log-level", "warning"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "SWITCHBOARD_STORE_CONNECT_TIMEOUT_S": "2"})
    assert done.returncode == 1 and "cannot reach the PostgreSQL store" in done.stderr
