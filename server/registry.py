"""Task name → current version → engine slot, backed by the durable store, with pins and LRU tiers.

Tiers: device slots (the engine's byte budget) ← host cache (parsed adapters, bytes-bounded LRU) ←
store (blobs on disk). A version is loaded into a slot on first use; when the budget is full the least
recently used *unpinned* version is evicted. Requests pin the version they were admitted with and
finish on it even if a new version or a rollback switches the name meanwhile. Everything is keyed by
content hash, never by name. Engine loads and unloads never run under the registry lock nor on the
event loop.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

from adapter_store.formats import native
from adapter_store.store import AdapterStore, VersionRecord
from server.engine import CapacityError, Engine, ResidentTask
from server.errors import TaskNotFound, VersionNotFound
from server.metrics import Metrics
from server.task_adapter import TaskAdapter


@dataclass
class TaskVersion:
    task: str
    version: int
    kind: str
    labels: list[str]
    params: int
    bytes: int
    sha256: str
    created_at: float
    resident: ResidentTask | None = None
    pins: int = 0
    current: bool = True
    loaded_at: float = 0.0

    @classmethod
    def from_record(cls, r: VersionRecord, current: bool) -> "TaskVersion":
        return cls(r.task, r.version, r.kind, r.labels, r.params, r.bytes, r.sha256, r.created_at, current=current)

    def summary(self) -> dict[str, object]:
        return {"task": self.task, "version": self.version, "kind": self.kind, "num_labels": len(self.labels),
                "labels": self.labels, "params": self.params, "bytes": self.bytes, "sha256": self.sha256}


@dataclass
class TaskEntry:
    current: TaskVersion
    versions: list[TaskVersion] = field(default_factory=list)


class HostCache:
    """Parsed adapters by content hash, least recently used dropped past `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, TaskAdapter] = collections.OrderedDict()
        self.bytes = 0

    def get(self, sha256: str) -> TaskAdapter | None:
        adapter = self._items.get(sha256)
        if adapter is not None:
            self._items.move_to_end(sha256)
        return adapter

    def put(self, sha256: str, adapter: TaskAdapter) -> None:
        if sha256 in self._items or adapter.nbytes > self.max_bytes:
            return
        self._items[sha256] = adapter
        self.bytes += adapter.nbytes
        while self.bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= dropped.nbytes

    def discard(self, sha256: str) -> None:
        adapter = self._items.pop(sha256, None)
        if adapter is not None:
            self.bytes -= adapter.nbytes


class Registry:
    def __init__(self, engine: Engine, metrics: Metrics, store: AdapterStore, host_cache_bytes: int = 256 << 20) -> None:
        self._engine = engine
        self._metrics = metrics
        self._store = store
        self._host = HostCache(host_cache_bytes)
        self._tasks: dict[str, TaskEntry] = {}
        self._resident: collections.OrderedDict[int, TaskVersion] = collections.OrderedDict()  # LRU by use
        self._to_unload: list[TaskVersion] = []
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
            for task, records in versions.items():
                tvs = [TaskVersion.from_record(r, current=r.version == current[task]) for r in records]
                by_number = {tv.version: tv for tv in tvs}
                if current[task] in by_number:
                    self._tasks[task] = TaskEntry(current=by_number[current[task]], versions=tvs)
        self._update_gauges()
        return len(self._tasks)

    # ----- writes ------------------------------------------------------------------------------------
    def put(self, task: str, adapter: TaskAdapter, fingerprint: str) -> TaskVersion:
        """Durably store, load into a slot, then switch the name (blocking: call off the event loop)."""
        start = time.perf_counter()
        digest = adapter.content_hash()
        blob = native.dumps(adapter, fingerprint)
        with self._write_lock:
            self._store.write_blob(digest, blob)
            record = self._store.add_version(task, digest, adapter.kind, adapter.labels, adapter.num_params,
                                             adapter.nbytes)
            tv = TaskVersion.from_record(record, current=True)
            self._switch(task, tv)
        try:
            self.ensure_resident(tv, adapter)
        except CapacityError:
            pass  # stored and current: it loads on first use, when unpinned slots may be free again
        finally:
            self.release(tv)
        self.unload_released()
        self._metrics.adapter_load_duration.observe(time.perf_counter() - start)
        return tv

    def _switch(self, task: str, tv: TaskVersion) -> None:
        with self._lock:
            entry = self._tasks.get(task)
            if entry is None:
                self._tasks[task] = TaskEntry(current=tv, versions=[tv])
            else:
                self._retire(entry.current)
                entry.current = tv
                entry.versions.append(tv)
            tv.pins += 1  # hold it while loading so it cannot be evicted before its first use

    def rollback(self, task: str, version: int) -> TaskVersion:
        # The SQLite commit (an fsync) happens outside `_lock`, which the event loop takes per request;
        # `_write_lock` keeps every other writer out meanwhile, so the entry cannot change under us.
        with self._write_lock:
            with self._lock:
                entry = self._tasks.get(task)
                if entry is None:
                    raise TaskNotFound(f"unknown task {task!r}")
                target = next((v for v in entry.versions if v.version == version), None)
                if target is None:
                    raise VersionNotFound(f"task {task!r} has no version {version}")
            self._store.set_current(task, version)
            with self._lock:
                if target is not entry.current:
                    self._retire(entry.current)
                    target.current = True
                    entry.current = target
        self.unload_released()
        return target

    def delete(self, task: str) -> None:
        with self._write_lock:
            with self._lock:
                if task not in self._tasks:
                    raise TaskNotFound(f"unknown task {task!r}")
            self._store.delete(task)  # outside `_lock`, as in rollback
            with self._lock:
                entry = self._tasks.pop(task)
                for tv in entry.versions:
                    self._retire(tv)
            self.unload_released()
            for tv in entry.versions:
                # a pinned version may still need its blob to load; it becomes an orphan, removed at open
                if tv.pins == 0 and self._store.unreferenced(tv.sha256):
                    self._host.discard(tv.sha256)
                    self._store.remove_blob(tv.sha256)

    # ----- requests ----------------------------------------------------------------------------------
    def acquire(self, task: str) -> TaskVersion:
        """Pin the current version for one request (cheap: safe on the event loop). If its `resident`
        is None, call `ensure_resident` off the loop before using it."""
        with self._lock:
            entry = self._tasks.get(task)
            if entry is None:
                raise TaskNotFound(f"unknown task {task!r}")
            tv = entry.current
            tv.pins += 1
            if tv.resident is not None:
                self._resident.move_to_end(tv.resident.slot)
            return tv

    def release(self, tv: TaskVersion) -> None:
        """Unpin (cheap: safe on the event loop). A non-current version is unloaded by `unload_released`."""
        with self._lock:
            tv.pins -= 1
            if not tv.current and tv.pins == 0 and tv.resident is not None:
                self._to_unload.append(tv)

    def ensure_resident(self, tv: TaskVersion, adapter: TaskAdapter | None = None) -> None:
        """Load a pinned version into a slot, evicting least recently used unpinned versions if needed.

        The host cache is filled only by reloads from the store, so a freshly uploaded (resident)
        version is not held twice in memory."""
        with self._load_lock:
            if tv.resident is not None:
                return
            start = time.perf_counter()
            adapter = adapter or self._host.get(tv.sha256)
            if adapter is None:
                adapter = native.loads(self._store.read_blob(tv.sha256), self._engine.spec.fingerprint)
                self._host.put(tv.sha256, adapter)
            while True:
                try:
                    resident = self._engine.load(adapter)
                    break
                except CapacityError:
                    if not self._evict_one():
                        raise
            with self._lock:
                tv.resident = resident
                tv.loaded_at = time.monotonic()
                self._resident[resident.slot] = tv
            self._metrics.adapter_loads.inc()
            self._metrics.adapter_load_duration.observe(time.perf_counter() - start)
        self._update_gauges()

    def _evict_one(self) -> bool:
        with self._lock:
            victim = next((tv for tv in self._resident.values() if tv.pins == 0), None)
            if victim is None:
                return False
            del self._resident[victim.resident.slot]
            slot, victim.resident = victim.resident.slot, None
        self._engine.unload(slot)
        self._metrics.adapter_evictions.inc()
        self._metrics.eviction_age.observe(time.monotonic() - victim.loaded_at)
        return True

    # ----- reads -------------------------------------------------------------------------------------
    def get(self, task: str) -> TaskEntry:
        with self._lock:
            entry = self._tasks.get(task)
            if entry is None:
                raise TaskNotFound(f"unknown task {task!r}")
            return TaskEntry(entry.current, list(entry.versions))

    def snapshot(self) -> list[TaskEntry]:
        with self._lock:
            return [TaskEntry(e.current, list(e.versions)) for _, e in sorted(self._tasks.items())]

    # ----- housekeeping ------------------------------------------------------------------------------
    def unload_released(self) -> None:
        """Free the slots of non-current, unpinned versions (blocks on the engine lock: not on the loop)."""
        with self._lock:
            pending, self._to_unload = self._to_unload, []
            slots = []
            for tv in pending:
                if tv.resident is not None and not tv.current and tv.pins == 0:
                    slots.append(tv.resident.slot)
                    del self._resident[tv.resident.slot]
                    tv.resident = None
        for slot in slots:
            self._engine.unload(slot)
        self._update_gauges()

    def _retire(self, tv: TaskVersion) -> None:
        tv.current = False
        if tv.pins == 0 and tv.resident is not None:
            self._to_unload.append(tv)

    def _update_gauges(self) -> None:
        m = self._metrics
        m.resident_adapters.set(self._engine.resident_tasks)
        m.resident_bytes.set(self._engine.resident_bytes)
        m.host_cache_bytes.set(self._host.bytes)
        m.registered_tasks.set(len(self._tasks))


