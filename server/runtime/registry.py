"""(tenant, task) → current version → engine slot, backed by the durable store, with leases and LRU tiers.

Tasks are keyed by (tenant, task): another tenant's task is simply not there (the same 404 as a task
that does not exist). Storage quotas (tasks, stored bytes) are checked under the write lock, before
anything is written.

Tiers: device slots (the engine's byte budget) ← host cache (parsed adapters, bytes-bounded LRU) ←
store (blobs on disk). A version is loaded into a slot on first use; when the budget is full the least
recently used *unpinned* version is evicted. Requests lease the version they were admitted with and
finish on it even if a new version or a rollback switches the name meanwhile. Everything is keyed by
content hash, never by name. Engine loads and unloads never run under the registry lock nor on the
event loop.
"""

from __future__ import annotations

import difflib
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from cachetools import LRUCache

from switchboard.adapter_store.formats import native
from switchboard.adapter_store.records import TaskKey, VersionRecord
from switchboard.adapter_store.store import Store
from switchboard.server.core.adapter import TaskAdapter
from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.core.books import SlotBooks
from switchboard.server.core.engine import CapacityError, ResidentTask
from switchboard.server.errors import QuotaExceeded, TaskNotFound, VersionNotFound
from switchboard.server.metrics import Metrics
from switchboard.server.runtime.lease import FixedSlot, Lease

log = logging.getLogger(__name__)
SUGGESTION_CANDIDATES = 1000  # names a 404's did-you-mean compares, at most (it runs on the event loop)


class SlotEngine(Protocol):
    """What the registry needs from the engine (tests drive it with a fake)."""

    spec: BackboneSpec
    max_adapter_bytes: int
    books: SlotBooks  # slots, bytes and LRU order: the registry holds its versions there, not in a copy

    def load(self, adapter: TaskAdapter, sha256: str | None = None, blob: bytes | None = None) -> ResidentTask: ...

    def check_fits(self, adapter: TaskAdapter) -> int: ...

    def unload(self, task: int) -> None: ...

    @property
    def resident_tasks(self) -> int: ...

    @property
    def resident_bytes(self) -> int: ...

    @property
    def pool_count(self) -> int: ...


@dataclass(eq=False)
class _Version:
    """The runtime state of one stored version (the record itself is immutable)."""

    record: VersionRecord
    current: bool = True
    resident: ResidentTask | None = None
    pins: int = 0
    loaded_at: float = 0.0

    @property
    def slot(self) -> int | None:
        return self.resident.slot if self.resident is not None else None

    @property
    def temperature(self) -> float:
        return self.resident.temperature if self.resident is not None else 1.0


def _evictable(holder: object) -> bool:
    """A held slot may be evicted when its version is loaded and no request leases it. Under `_lock`."""
    return isinstance(holder, _Version) and holder.pins == 0 and holder.resident is not None


@dataclass
class _Entry:
    current: _Version
    versions: list[_Version] = field(default_factory=list)


@dataclass(frozen=True)
class StorageQuota:
    """A tenant's storage limits (None: unlimited)."""

    max_tasks: int | None = None
    max_adapter_bytes: int | None = None


@dataclass(frozen=True)
class Usage:
    tasks: int
    adapter_bytes: int  # bytes of every stored version of every task


@dataclass(frozen=True)
class TaskView:
    """A task's current version and all its versions, as read at one moment."""

    current: VersionRecord
    versions: list[VersionRecord]


class Registry:
    def __init__(self, engine: SlotEngine, metrics: Metrics, store: Store,
                 host_cache_bytes: int = 256 << 20) -> None:
        self._engine = engine
        self._metrics = metrics
        self._store = store
        # parsed adapters by content hash, least recently used dropped past the byte budget
        self._host: LRUCache[str, TaskAdapter] = LRUCache(maxsize=max(1, host_cache_bytes),
                                                          getsizeof=lambda adapter: adapter.nbytes)
        self._tasks: dict[TaskKey, _Entry] = {}  # change through _add/_remove: they keep _names in step
        self._names: dict[str, set[str]] = {}  # tenant → its task names, for a 404's did-you-mean
        self._books = engine.books  # residency and LRU order (the engine's own record of its slots)
        self._to_unload: list[_Version] = []
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        # Serialises store writes with the registry switch (put / rollback / delete), so the store and
        # the in-memory view never disagree and a delete cannot remove a blob a put is committing.
        self._write_lock = threading.Lock()

    # ----- start-up ----------------------------------------------------------------------------------
    def restore(self) -> int:
        """Every acknowledged version from the store; slots are loaded lazily on first use."""
        current, versions = self._store.load_all()
        with self._lock:
            for key, records in versions.items():
                states = [_Version(r, current=r.version == current[key]) for r in records]
                by_number = {v.record.version: v for v in states}
                if current[key] in by_number:
                    self._add(key, _Entry(current=by_number[current[key]], versions=states))
        self._update_gauges()
        return len(self._tasks)

    # ----- other replicas' writes --------------------------------------------------------------------
    def refresh(self, key: TaskKey) -> None:
        """Apply the store's state of one task (another replica uploaded, rolled back or deleted it).
        Under the write lock, so it never interleaves with this replica's own write of the same task."""
        with self._write_lock:
            current, records = self._store.task(*key)
            self._apply(key, current, records)
        self.unload_released()
        self._update_gauges()

    def resync(self) -> int:
        """Apply the store's whole state (after missed notifications); returns how many tasks changed."""
        with self._write_lock:
            current, versions = self._store.load_all()
            with self._lock:
                keys = set(current) | set(self._tasks)
            changed = sum(self._apply(key, current.get(key), versions.get(key, [])) for key in keys)
        self.unload_released()
        self._update_gauges()
        return changed

    def _apply(self, key: TaskKey, current: int | None, records: list[VersionRecord]) -> bool:
        """Make this task's view equal the store's; versions already known keep their runtime state
        (slots, pins). True if anything changed."""
        with self._lock:
            entry = self._tasks.get(key)
            by_number = {r.version: r for r in records}
            if current is None or current not in by_number:
                if entry is None:
                    return False
                self._remove(key)
                for v in entry.versions:
                    self._retire(v)
                return True
            if entry is None:
                states = [_Version(r, current=r.version == current) for r in records]
                self._add(key, _Entry(current=next(v for v in states if v.current), versions=states))
                return True
            known = {v.record.version: v for v in entry.versions}
            added = [_Version(r, current=False) for n, r in by_number.items() if n not in known]
            entry.versions = sorted([*entry.versions, *added], key=lambda v: v.record.version)
            target = next(v for v in entry.versions if v.record.version == current)
            if target is entry.current:
                return bool(added)
            self._retire(entry.current)
            target.current = True
            entry.current = target
            return True

    # ----- writes ------------------------------------------------------------------------------------
    def put(self, key: TaskKey, adapter: TaskAdapter, fingerprint: str,
            quota: StorageQuota | None = None) -> VersionRecord:
        """Durably store, load into a slot, then switch the name (blocking: call off the event loop).

        An adapter that could never fit the slot budget (CapacityError) or the tenant's quota
        (QuotaExceeded) is refused before anything is written."""
        start = time.perf_counter()
        self._engine.check_fits(adapter)
        digest = adapter.content_hash()
        blob = native.dumps(adapter, fingerprint)
        tenant, task = key
        with self._write_lock:
            if quota is not None:
                self._check_quota(key, adapter.nbytes, quota)
            record = self._store.add_version(tenant, task, digest, adapter.kind, adapter.labels,
                                             adapter.num_params, adapter.nbytes, blob)
            lease = self._switch(key, _Version(record))
        with lease:  # held while loading, so it cannot be evicted before its first use
            try:
                self.ensure_resident(lease, adapter)
            except CapacityError:
                log.info("task %r of tenant %r version %d stored but not loaded (no slot free now); it loads on "
                         "first use", task, tenant, record.version)
        self.unload_released()
        self._metrics.adapter_load_duration.observe(time.perf_counter() - start)
        return record

    def _check_quota(self, key: TaskKey, nbytes: int, quota: StorageQuota) -> None:
        usage = self.usage(key[0])
        if quota.max_tasks is not None and key not in self._tasks and usage.tasks >= quota.max_tasks:
            raise QuotaExceeded(f"tenant {key[0]!r} has {usage.tasks} tasks, its quota (max_tasks)")
        if quota.max_adapter_bytes is not None and usage.adapter_bytes + nbytes > quota.max_adapter_bytes:
            raise QuotaExceeded(f"tenant {key[0]!r} stores {usage.adapter_bytes} adapter bytes; {nbytes} more would "
                                f"pass its quota of {quota.max_adapter_bytes} (max_adapter_bytes)")

    def usage(self, tenant: str) -> Usage:
        with self._lock:
            entries = [e for (t, _), e in self._tasks.items() if t == tenant]
            return Usage(len(entries), sum(v.record.bytes for e in entries for v in e.versions))

    def _switch(self, key: TaskKey, version: _Version) -> Lease:
        with self._lock:
            entry = self._tasks.get(key)
            if entry is None:
                self._add(key, _Entry(current=version, versions=[version]))
            else:
                self._retire(entry.current)
                entry.current = version
                entry.versions.append(version)
            version.pins += 1
            return Lease(version, self._unpin)

    def rollback(self, key: TaskKey, version: int) -> VersionRecord:
        # The SQLite commit (an fsync) happens outside `_lock`, which the event loop takes per request;
        # `_write_lock` keeps every other writer out meanwhile, so the entry cannot change under us.
        with self._write_lock:
            with self._lock:
                entry = self._tasks.get(key)
                target = None if entry is None else next(
                    (v for v in entry.versions if v.record.version == version), None)
            if entry is None:
                raise self._unknown(key)
            if target is None:
                raise VersionNotFound(f"task {key[1]!r} has no version {version}")
            self._store.set_current(*key, version)
            with self._lock:
                if target is not entry.current:
                    self._retire(entry.current)
                    target.current = True
                    entry.current = target
        self.unload_released()
        return target.record

    def delete(self, key: TaskKey) -> None:
        with self._write_lock:
            with self._lock:
                known = key in self._tasks
            if not known:
                raise self._unknown(key)
            self._store.delete(*key)  # outside `_lock`, as in rollback
            with self._lock:
                entry = self._remove(key)
                for v in entry.versions:
                    self._retire(v)
            self.unload_released()
            for v in entry.versions:
                # a pinned version may still need its blob to load; it becomes an orphan, removed at open
                if v.pins == 0 and self._store.release_blob(v.record.sha256):
                    with self._lock:
                        self._host.pop(v.record.sha256, None)

    # ----- requests ----------------------------------------------------------------------------------
    def acquire(self, key: TaskKey) -> Lease:
        """Lease the current version for one request (cheap: safe on the event loop). If its `slot` is
        None, call `ensure_resident` off the loop before using it."""
        with self._lock:
            entry = self._tasks.get(key)
            if entry is not None:
                version = entry.current
                version.pins += 1
                if version.resident is not None:
                    self._books.touch(version.resident.slot)
                return Lease(version, self._unpin)
        raise self._unknown(key)

    def _unpin(self, version: _Version) -> None:
        """A lease's release (cheap: safe on the event loop). A retired version is unloaded later by
        `unload_released`, off the loop."""
        with self._lock:
            version.pins -= 1
            if not version.current and version.pins == 0 and version.resident is not None:
                self._to_unload.append(version)

    def ensure_resident(self, lease: Lease, adapter: TaskAdapter | None = None) -> None:
        """Load a leased version into a slot, evicting least recently used unpinned versions if needed.

        The host cache is filled only by reloads from the store, so a freshly uploaded (resident)
        version is not held twice in memory."""
        version = lease.pinned
        assert isinstance(version, _Version) and not lease.released
        with self._load_lock:
            if version.resident is not None:
                return
            start = time.perf_counter()
            sha = version.record.sha256
            blob = None  # read from the store: handed on as it is, so a worker process parses it without a re-dump
            if adapter is None:
                with self._lock:
                    adapter = self._host.get(sha)
            if adapter is None:
                blob = self._store.read_blob(sha)
                adapter = native.loads(blob, self._engine.spec.fingerprint)
                with self._lock:
                    if adapter.nbytes <= self._host.maxsize:
                        self._host[sha] = adapter
            self._make_room(self._engine.check_fits(adapter))
            while True:
                try:
                    resident = self._engine.load(adapter, sha256=sha, blob=blob)
                    break
                except CapacityError:
                    if not self._evict_one():
                        raise
            with self._lock:
                version.resident = resident
                version.loaded_at = time.monotonic()
                self._books.hold(resident.slot, version)
            self._metrics.adapter_loads.inc()
            self._metrics.adapter_load_duration.observe(time.perf_counter() - start)
        self._update_gauges()

    @contextmanager
    def trial(self, adapter: TaskAdapter) -> Iterator[Lease]:
        """A version not stored (yet): loaded into a slot, evicting LRU unpinned versions if needed, for a
        trial such as an upload's canary; unloaded when the block ends. Blocking: call off the loop."""
        with self._load_lock:
            self._make_room(self._engine.check_fits(adapter))
            while True:
                try:
                    resident = self._engine.load(adapter)
                    break
                except CapacityError:
                    if not self._evict_one():
                        raise
        self._update_gauges()
        try:
            yield Lease(FixedSlot(resident.slot), lambda _: None)
        finally:
            self._engine.unload(resident.slot)
            self._update_gauges()

    def _make_room(self, nbytes: int) -> None:
        """Refuse a load that evicting every unleased version could not make room for — before evicting
        anything, so one request cannot empty the slots of every other task for nothing."""
        with self._lock:
            evictable = self._books.evictable_bytes(_evictable)
        short = self._engine.resident_bytes + nbytes - evictable - self._engine.max_adapter_bytes
        if short > 0:
            raise CapacityError(f"{nbytes} bytes needed; the slot budget is {self._engine.max_adapter_bytes} bytes "
                                f"and in-flight requests hold {short} bytes too many")

    def _evict_one(self) -> bool:
        with self._lock:
            booking = self._books.least_recent(_evictable)
            if booking is None:
                return False
            victim = booking.holder
            assert isinstance(victim, _Version)
            slot = booking.slot
            victim.resident = None
        self._engine.unload(slot)
        self._metrics.adapter_evictions.inc()
        self._metrics.eviction_age.observe(time.monotonic() - victim.loaded_at)
        return True

    # ----- reads -------------------------------------------------------------------------------------
    def get(self, key: TaskKey) -> TaskView:
        with self._lock:
            entry = self._tasks.get(key)
            if entry is not None:
                return TaskView(entry.current.record, [v.record for v in entry.versions])
        raise self._unknown(key)

    def _unknown(self, key: TaskKey) -> TaskNotFound:
        """The 404, with a did-you-mean drawn only from the caller's own tenant (another tenant's names
        never show), among at most SUGGESTION_CANDIDATES names. Call without `_lock`."""
        tenant, name = key
        with self._lock:
            names = list(self._names.get(tenant, ()))
        # difflib's cutoff (ratio 2·matches/(a+b) ≥ 0.6) needs lengths within a factor of 7/3: no match is lost
        close = difflib.get_close_matches(name, list(itertools.islice(
            (n for n in names if 7 * len(n) >= 3 * len(name) and 7 * len(name) >= 3 * len(n)),
            SUGGESTION_CANDIDATES)), n=1)
        return TaskNotFound(f"unknown task {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""))

    def _add(self, key: TaskKey, entry: _Entry) -> None:
        """Under `_lock`."""
        self._tasks[key] = entry
        self._names.setdefault(key[0], set()).add(key[1])

    def _remove(self, key: TaskKey) -> _Entry:
        """Under `_lock`."""
        entry = self._tasks.pop(key)
        names = self._names.get(key[0])
        if names is not None:
            names.discard(key[1])
            if not names:
                del self._names[key[0]]
        return entry

    @property
    def registered_tasks(self) -> int:
        with self._lock:
            return len(self._tasks)

    def residency(self) -> list[tuple[VersionRecord, int, float]]:
        """(record, pins, seconds resident) of every version in a device slot, most recently used last."""
        now = time.monotonic()
        with self._lock:
            return [(v.record, v.pins, now - v.loaded_at) for v in self._books.held()
                    if isinstance(v, _Version) and v.resident is not None]

    def page(self, tenant: str, after: str | None, limit: int) -> list[TaskView]:
        """Up to `limit` of the tenant's tasks named after `after`, by name."""
        with self._lock:
            names = sorted(task for t, task in self._tasks if t == tenant and (after is None or task > after))
            return [TaskView(self._tasks[(tenant, n)].current.record,
                             [v.record for v in self._tasks[(tenant, n)].versions]) for n in names[:limit]]

    # ----- housekeeping ------------------------------------------------------------------------------
    def unload_released(self) -> None:
        """Free the slots of non-current, unpinned versions (blocks on the engine lock: not on the loop)."""
        with self._lock:
            pending, self._to_unload = self._to_unload, []
            slots = []
            for v in pending:
                if v.resident is not None and not v.current and v.pins == 0:
                    slots.append(v.resident.slot)
                    v.resident = None
        for slot in slots:
            self._engine.unload(slot)
        self._update_gauges()

    def _retire(self, version: _Version) -> None:
        version.current = False
        if version.pins == 0 and version.resident is not None:
            self._to_unload.append(version)

    def _update_gauges(self) -> None:
        m = self._metrics
        m.resident_adapters.set(self._engine.resident_tasks)
        m.resident_bytes.set(self._engine.resident_bytes)
        m.slot_pools.set(self._engine.pool_count)
        m.host_cache_bytes.set(self._host.currsize)
        m.registered_tasks.set(len(self._tasks))
