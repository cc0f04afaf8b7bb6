"""Durability and hot swap: restart restores every acknowledged version, rollback, LRU eviction under a
byte budget, and a server killed with SIGKILL in the middle of uploads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from switchboard.adapter_store.records import StoreInUseError
from switchboard.adapter_store.sqlite_store import SQLiteStore
from tests.factories import TEXTS, random_adapter
from tests.server_fixture import ROOT, free_port, metric_samples, running_server, serving_in_thread, upload


def classify(url: str, task: str) -> dict:
    r = httpx.post(f"{url}/v1/classify", json={"task": task, "inputs": TEXTS[:3], "raw_scores": True}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_restart_restores_versions_rollback_and_deletes(tiny_dir, tmp_path, adapters):
    names = list(adapters)[:4]
    with serving_in_thread(tmp_path, tiny_dir[1]) as (url, _):
        fp = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
        for task in names:
            assert upload(url, task, adapters[task], fp).status_code == 201
        v1 = classify(url, "task-0")
        assert upload(url, "task-0", adapters["task-5"], fp).json()["version"] == 2
        v2 = classify(url, "task-0")
        assert v2["version"] == 2 and v2["predictions"] != v1["predictions"]
        r = httpx.post(f"{url}/v1/tasks/task-0/rollback", json={"version": 1})
        assert r.status_code == 200 and r.json()["version"] == 1
        assert classify(url, "task-0") == v1  # the old weights, exactly
        assert httpx.post(f"{url}/v1/tasks/task-0/rollback", json={"version": 9}).status_code == 404
        assert httpx.post(f"{url}/v1/tasks/nope/rollback", json={"version": 1}).status_code == 404
        assert httpx.delete(f"{url}/v1/tasks/task-3").status_code == 204
        before = {task: classify(url, task) for task in names[:3]}
        listing = httpx.get(f"{url}/v1/tasks").json()
    with serving_in_thread(tmp_path, tiny_dir[1]) as (url, _):  # same data dir: a restart
        assert httpx.get(f"{url}/v1/tasks").json() == listing
        assert {task: classify(url, task) for task in names[:3]} == before
        assert httpx.post(f"{url}/v1/classify", json={"task": "task-3", "inputs": "x"}).status_code == 404
        assert httpx.post(f"{url}/v1/tasks/task-0/rollback", json={"version": 2}).json()["version"] == 2
        assert classify(url, "task-0")["predictions"] == v2["predictions"]
    blobs = list((tmp_path / "blobs").glob("*.safetensors"))
    assert len(blobs) == 4  # task-0 v1 (= task-0's own), v2 (= task-5's weights), task-1, task-2; task-3 gone


def test_lru_eviction_under_a_byte_budget_keeps_answers_right(tiny_dir, tmp_path, adapters):
    tasks = {t: adapters[t] for t in ["task-0", "task-3", "task-6", "task-8"]}  # IA3 tasks of similar size
    budget = max(a.nbytes for a in tasks.values()) * 2 + 1000  # room for two of them
    with serving_in_thread(tmp_path, tiny_dir[1], max_adapter_bytes=budget) as (url, _):
        fp = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
        first = {}
        for task, adapter in tasks.items():
            assert upload(url, task, adapter, fp).status_code == 201
            first[task] = classify(url, task)
        for _ in range(2):
            for task in tasks:
                assert classify(url, task) == first[task]
        samples = metric_samples(url)
        assert samples["switchboard_adapter_evictions_total"] >= 4
        assert samples["switchboard_resident_adapter_bytes"] <= budget


def test_sigkill_during_uploads_loses_no_acknowledged_version(tiny_dir, tmp_path, adapters):
    acknowledged: dict[tuple[str, int], str] = {}
    stop = threading.Event()
    with running_server(tiny_dir[0], tmp_path) as (url, proc):
        fp = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]

        def uploader(worker: int) -> None:
            i = 0
            while not stop.is_set():
                task = f"crash-{worker}-{i % 3}"
                adapter = random_adapter(tiny_dir[1].spec, seed=1000 * worker + i, kind="ia3")
                try:
                    r = upload(url, task, adapter, fp)
                except httpx.HTTPError:
                    return
                if r.status_code == 201:
                    acknowledged[(task, r.json()["version"])] = r.json()["sha256"]
                i += 1

        threads = [threading.Thread(target=uploader, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        time.sleep(2.5)
        os.kill(proc.pid, signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(30)
        proc.wait(10)
    assert len(acknowledged) >= 5, "the uploaders should have been acknowledged several times before the kill"
    store = SQLiteStore(tmp_path)  # opening removes orphans; the store must be consistent
    current, versions = store.load_all()
    stored = {(r.task, r.version): r.sha256 for rs in versions.values() for r in rs}
    for key, sha in acknowledged.items():
        assert stored.get(key) == sha, f"acknowledged version {key} lost or changed"
    for rs in versions.values():
        for r in rs:
            assert store.blob_path(r.sha256).is_file()
    store.close()
    with serving_in_thread(tmp_path, tiny_dir[1]) as (url, _):  # restarts and serves every task
        for (tenant, task), version in current.items():
            assert tenant == "default" and classify(url, task)["version"] == version


def test_one_process_per_data_dir(tiny_dir, tmp_path):
    """A second server on a data dir in use exits non-zero with the reason, and the first keeps serving."""
    with serving_in_thread(tmp_path, tiny_dir[1]) as (url, _):
        second = subprocess.run([sys.executable, "-m", "switchboard.clients.cli", "serve", "--port", str(free_port()),
                                 "--data-dir", str(tmp_path), "--model", str(tiny_dir[0]), "--log-level", "warning"],
                                capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert second.returncode == 1
        assert "in use by another Switchboard process" in second.stderr
        assert httpx.get(f"{url}/health").status_code == 200
    with pytest.raises(StoreInUseError):  # in-process too; released on close
        first = SQLiteStore(tmp_path)
        try:
            SQLiteStore(tmp_path)
        finally:
            first.close()
    SQLiteStore(tmp_path).close()
