"""One suite, every store backend: the embedded SQLite store and the shared PostgreSQL store (a real
PostgreSQL 15 cluster started for the session) give the same answers and the same guarantees —
immutable content-addressed versions, numbers that never repeat per (tenant, task) even under
concurrent writers, rollback, delete, shared blobs released only when unreferenced, tenants and keys
surviving a reopen. The PostgreSQL store also reports other processes' changes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from switchboard.adapter_store.records import KeyRecord, StoreChange, TenantRecord
from switchboard.adapter_store.store import Store, open_store, redact

SHA = ["%064x" % (i + 1) for i in range(8)]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path) -> tuple[str | None, Path]:
    """(store URL, data dir) for one backend; call `open_store(*backend)` to open it (again)."""
    if request.param == "sqlite":
        return None, tmp_path / "data"
    return request.getfixturevalue("pg_url"), tmp_path / "cache"


def add(store: Store, tenant: str, task: str, sha: str, blob: bytes = b"blob") -> int:
    return store.add_version(tenant, task, sha, "ia3", ["a", "b"], 10, len(blob), blob).version


def test_versions_rollback_delete_and_reopen(backend):
    store = open_store(*backend)
    try:
        assert [add(store, "t1", "x", SHA[i]) for i in range(3)] == [1, 2, 3]
        assert add(store, "t2", "x", SHA[0]) == 1  # numbers are per (tenant, task)
        store.set_current("t1", "x", 1)
        current, versions = store.task("t1", "x")
        assert current == 1 and [r.version for r in versions] == [1, 2, 3]
        assert versions[2].sha256 == SHA[2] and versions[2].labels == ["a", "b"] and versions[2].bytes == 4
        store.delete("t1", "x")
        assert store.task("t1", "x") == (None, [])
        assert add(store, "t1", "x", SHA[4]) == 4  # never a number used before, even after a delete
        assert store.read_blob(SHA[4]) == b"blob"
    finally:
        store.close()
    store = open_store(*backend)  # reopen: everything acknowledged is there
    try:
        current, versions = store.load_all()
        assert current == {("t1", "x"): 4, ("t2", "x"): 1}
        assert [r.version for r in versions[("t1", "x")]] == [4] and versions[("t2", "x")][0].sha256 == SHA[0]
    finally:
        store.close()


def test_shared_blobs_are_released_only_when_no_version_refers_to_them(backend):
    store = open_store(*backend)
    try:
        add(store, "a", "same", SHA[1], b"shared bytes")
        add(store, "b", "same", SHA[1], b"shared bytes")
        store.delete("a", "same")
        assert not store.release_blob(SHA[1])  # tenant b's version still refers to it
        assert store.read_blob(SHA[1]) == b"shared bytes"
        store.delete("b", "same")
        assert store.release_blob(SHA[1])
        with pytest.raises(FileNotFoundError):
            store.read_blob(SHA[1])
    finally:
        store.close()


def test_tenants_and_keys_survive_a_reopen_and_revocation_is_once(backend):
    store = open_store(*backend)
    try:
        store.put_tenant(TenantRecord("acme", 1.0, max_tasks=3))
        store.put_tenant(TenantRecord("acme", 1.0, max_tasks=5, max_queued_rows=7))  # an update, not a second row
        store.add_key(KeyRecord("k1", "h" * 64, "acme", ("classify",), "ci", 2.0, expires_at=9.0))
        assert store.revoke_key("k1", 3.0) and not store.revoke_key("k1", 4.0) and not store.revoke_key("nope", 4.0)
    finally:
        store.close()
    store = open_store(*backend)
    try:
        assert store.tenants() == [TenantRecord("acme", 1.0, 5, None, 7)]
        assert store.api_keys() == [KeyRecord("k1", "h" * 64, "acme", ("classify",), "ci", 2.0, 9.0, 3.0)]
    finally:
        store.close()


def test_concurrent_writers_get_distinct_increasing_numbers(backend):
    url, data = backend
    # PostgreSQL: two store instances (as two replicas would hold); SQLite allows one per data dir
    stores = [open_store(url, data)] + ([open_store(url, data.with_name("replica-b"))] if url else [])
    try:
        with ThreadPoolExecutor(8) as pool:
            numbers = list(pool.map(lambda i: add(stores[i % len(stores)], "t", "hot", SHA[i % 8]), range(40)))
        assert sorted(numbers) == list(range(1, 41))
        current, versions = stores[0].task("t", "hot")
        assert current in numbers and len(versions) == 40
    finally:
        for store in stores:
            store.close()


def test_a_shared_store_reports_other_replicas_changes(pg_url, tmp_path):
    a, b = open_store(pg_url, tmp_path / "a"), open_store(pg_url, tmp_path / "b")
    seen: list[StoreChange] = []
    arrived = threading.Condition()

    def on_change(change: StoreChange) -> None:
        with arrived:
            seen.append(change)
            arrived.notify_all()

    def wait_for(change: StoreChange) -> float:
        start = time.monotonic()
        with arrived:
            assert arrived.wait_for(lambda: change in seen, timeout=2), (change, seen)
        return time.monotonic() - start

    try:
        b.watch(on_change)
        wait_for(StoreChange("resync"))  # after (re)connecting, whatever it missed
        assert b.healthy()
        add(a, "t", "x", SHA[0])
        assert wait_for(StoreChange("task", "t", "x")) < 1
        a.add_key(KeyRecord("k", "h" * 64, "t", ("manage",), None, 1.0))
        wait_for(StoreChange("keys", "t"))
        a.put_tenant(TenantRecord("t", 1.0))
        wait_for(StoreChange("tenants", "t"))
        assert b.read_blob(SHA[0]) == b"blob" and (tmp_path / "b" / "blob-cache" / f"{SHA[0]}.safetensors").is_file()
    finally:
        a.close()
        b.close()


def test_urls_pick_a_backend_and_passwords_never_reach_logs(tmp_path):
    assert redact("postgresql://sb:secret@db:5432/sb") == "postgresql://sb:***@db:5432/sb"
    assert redact("postgresql://db/sb") == "postgresql://db/sb"
    with pytest.raises(ValueError, match="postgresql://"):
        open_store("mysql://db/x", tmp_path)
    store = open_store(None, tmp_path)
    assert store.url == "sqlite" and store.healthy()
    store.close()
