"""The registry and its leases in-process, with a fake engine and a real store on a temp directory:
exactly-once release whatever the path, versions finish under a swap, LRU eviction spares leased
versions, deletes keep the blobs a lease still needs."""

from __future__ import annotations

import pytest

from switchboard.adapter_store.sqlite_store import SQLiteStore
from switchboard.server.core.engine import CapacityError
from switchboard.server.errors import TaskNotFound, VersionNotFound
from switchboard.server.metrics import Metrics
from switchboard.server.runtime.registry import Registry
from tests.factories import random_adapter
from tests.fakes import FakeEngine


@pytest.fixture
def registry(tiny, tmp_path):
    engine = FakeEngine(tiny.spec)
    store = SQLiteStore(tmp_path)
    yield Registry(engine, Metrics(), store, host_cache_bytes=1 << 20), engine, store
    store.close()


def put(registry: Registry, task: str, seed: int, spec, kind: str = "ia3", tenant: str = "default"):
    return registry.put((tenant, task), random_adapter(spec, seed=seed, kind=kind), spec.fingerprint)


def pins(registry: Registry, task: str, tenant: str = "default") -> dict[int, int]:
    """version → pins, read from the registry's own state."""
    return {v.record.version: v.pins for v in registry._tasks[(tenant, task)].versions}


def test_a_lease_releases_exactly_once_whatever_the_path(registry, tiny):
    reg, engine, _ = registry
    put(reg, "t", 1, tiny.spec)
    lease = reg.acquire(("default", "t"))
    assert pins(reg, "t") == {1: 1} and lease.slot is not None
    lease.release()
    lease.release()  # idempotent
    assert pins(reg, "t") == {1: 0}

    with reg.acquire(("default", "t")) as lease:  # a context manager releases on exit …
        moved = lease.transfer()  # … unless the pin moved to the next owner
        with pytest.raises(RuntimeError):
            lease.transfer()
    assert pins(reg, "t") == {1: 1} and not moved.released
    moved.release()
    moved.release()
    assert pins(reg, "t") == {1: 0}

    with pytest.raises(ZeroDivisionError):
        with reg.acquire(("default", "t")):
            raise ZeroDivisionError  # an error on the way releases too
    assert pins(reg, "t") == {1: 0}


def test_leased_versions_finish_on_their_slot_across_a_swap_and_a_rollback(registry, tiny):
    reg, engine, _ = registry
    put(reg, "t", 1, tiny.spec)
    old = reg.acquire(("default", "t"))
    put(reg, "t", 2, tiny.spec)  # a new version becomes current while v1 is leased
    new = reg.acquire(("default", "t"))
    assert (old.record.version, new.record.version) == (1, 2)
    reg.unload_released()
    assert engine.is_resident(old.slot), "a leased version must stay resident"
    slot = old.slot
    old.release()
    reg.unload_released()
    assert not engine.is_resident(slot), "a retired version is unloaded once its last lease ends"
    new.release()
    assert reg.rollback(("default", "t"), 1).version == 1
    with reg.acquire(("default", "t")) as lease:
        assert lease.record.version == 1 and lease.slot is None  # reloads on first use
        reg.ensure_resident(lease)
        assert engine.is_resident(lease.slot)
    with pytest.raises(VersionNotFound):
        reg.rollback(("default", "t"), 9)
    with pytest.raises(TaskNotFound):
        reg.acquire(("default", "nope"))


def test_lru_eviction_never_takes_a_leased_version(tiny, tmp_path):
    adapters = [random_adapter(tiny.spec, seed=i, kind="ia3") for i in range(3)]
    engine = FakeEngine(tiny.spec, max_adapter_bytes=max(a.nbytes for a in adapters) * 2)
    store = SQLiteStore(tmp_path)
    reg = Registry(engine, Metrics(), store)
    for i, adapter in enumerate(adapters):
        reg.put(("default", f"t{i}"), adapter, tiny.spec.fingerprint)  # the third upload evicts the least recent
    assert engine.resident_tasks == 2
    first, second = reg.acquire(("default", "t1")), reg.acquire(("default", "t2"))
    reg.ensure_resident(first)
    reg.ensure_resident(second)
    with reg.acquire(("default", "t0")) as third, pytest.raises(CapacityError):
        reg.ensure_resident(third)  # both resident versions are leased: nothing to evict
    first.release()
    with reg.acquire(("default", "t0")) as third:
        reg.ensure_resident(third)  # now t1 is evicted, t2 (still leased) is not
        assert engine.is_resident(second.slot) and engine.is_resident(third.slot)
    second.release()
    store.close()


def test_delete_keeps_the_blob_a_lease_still_needs(registry, tiny):
    reg, engine, store = registry
    record = put(reg, "t", 1, tiny.spec)
    lease = reg.acquire(("default", "t"))
    reg.delete(("default", "t"))
    assert store.blob_path(record.sha256).is_file()  # the leased version may still need to reload
    with pytest.raises(TaskNotFound):
        reg.get(("default", "t"))
    lease.release()
    reg.unload_released()
    assert engine.resident_tasks == 0
    other = put(reg, "u", 2, tiny.spec)
    reg.delete(("default", "u"))
    assert not store.blob_path(other.sha256).exists()


def test_a_load_that_cannot_fit_evicts_nothing(tiny, tmp_path):
    """One request for a version that cannot fit beside the leased ones must not empty every other
    task's slots first."""
    small = [random_adapter(tiny.spec, seed=i, kind="ia3") for i in range(3)]
    engine = FakeEngine(tiny.spec, max_adapter_bytes=small[0].nbytes * 3)
    store = SQLiteStore(tmp_path)
    reg = Registry(engine, Metrics(), store)
    for i, adapter in enumerate(small):
        reg.put(("default", f"t{i}"), adapter, tiny.spec.fingerprint)
    assert engine.resident_tasks == 3
    held = reg.acquire(("default", "t0"))
    big = random_adapter(tiny.spec, seed=9, kind="ia3", num_labels=40)  # fits alone, not beside t0
    assert small[0].nbytes * 2 < big.nbytes <= engine.max_adapter_bytes
    record = reg.put(("default", "big"), big, tiny.spec.fingerprint)  # stored; its load is refused without evicting
    assert record.version == 1 and engine.resident_tasks == 3
    with reg.acquire(("default", "big")) as lease, pytest.raises(CapacityError):
        reg.ensure_resident(lease)
    assert engine.resident_tasks == 3  # t1 and t2 are still resident
    held.release()
    with reg.acquire(("default", "big")) as lease:
        reg.ensure_resident(lease)  # now t0 can go too: room is made
        assert engine.is_resident(lease.slot)
    store.close()
