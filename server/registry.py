"""Task name → current version → resident engine slot, with pins for in-flight requests.

A new version serves new requests at once; requests admitted earlier finish on the version they
pinned, whose slot is freed once its last pin is released. Versions are identified by content hash,
never by name, so a re-upload can never be served from a stale slot. Version numbers of a name only
grow, across deletes too. Engine unloads never run under the registry lock nor on the event loop:
released versions are queued and unloaded by the inference worker (or the upload/delete thread).
(In-memory for now; the durable store plugs in behind `put`/`delete`.)
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field

from server.engine import Engine, ResidentTask
from server.errors import TaskNotFound
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
    retired: bool = False

    def summary(self) -> dict[str, object]:
        return {"task": self.task, "version": self.version, "kind": self.kind, "num_labels": len(self.labels),
                "labels": self.labels, "params": self.params, "bytes": self.bytes, "sha256": self.sha256}


@dataclass
class TaskEntry:
    current: TaskVersion
    versions: list[TaskVersion] = field(default_factory=list)


class Registry:
    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self._engine = engine
        self._metrics = metrics
        self._tasks: dict[str, TaskEntry] = {}
        self._next_version: dict[str, int] = {}
        self._to_unload: list[TaskVersion] = []
        self._lock = threading.Lock()

    def put(self, task: str, adapter: TaskAdapter) -> TaskVersion:
        """Load into the engine, then switch the name to the new version (blocking: call off the loop)."""
        start = time.perf_counter()
        digest = adapter.content_hash()
        resident = self._engine.load(adapter)
        with self._lock:
            number = self._next_version.get(task, 1)
            self._next_version[task] = number + 1
            tv = TaskVersion(task=task, version=number, kind=adapter.kind, labels=list(adapter.labels),
                             params=adapter.num_params, bytes=adapter.nbytes, sha256=digest,
                             created_at=time.time(), resident=resident)
            entry = self._tasks.get(task)
            if entry is None:
                entry = self._tasks[task] = TaskEntry(current=tv)
            else:
                self._retire(entry.current)
                entry.current = tv
            entry.versions.append(tv)
        self.unload_released()
        self._metrics.adapter_loads.inc()
        self._metrics.adapter_load_duration.observe(time.perf_counter() - start)
        return tv

    def acquire(self, task: str) -> TaskVersion:
        """Pin the current version for one request (cheap: safe on the event loop)."""
        with self._lock:
            entry = self._tasks.get(task)
            if entry is None:
                raise TaskNotFound(f"unknown task {task!r}")
            entry.current.pins += 1
            return entry.current

    def release(self, tv: TaskVersion) -> None:
        """Unpin (cheap: safe on the event loop). A retired version's slot is freed by `unload_released`."""
        with self._lock:
            tv.pins -= 1
            if tv.retired and tv.pins == 0:
                self._to_unload.append(tv)

    def delete(self, task: str) -> None:
        with self._lock:
            entry = self._tasks.pop(task, None)
            if entry is None:
                raise TaskNotFound(f"unknown task {task!r}")
            self._retire(entry.current)
        self.unload_released()

    def get(self, task: str) -> TaskEntry:
        with self._lock:
            entry = self._tasks.get(task)
            if entry is None:
                raise TaskNotFound(f"unknown task {task!r}")
            return copy.copy(entry)

    def snapshot(self) -> list[TaskEntry]:
        with self._lock:
            return [copy.copy(self._tasks[name]) for name in sorted(self._tasks)]

    def unload_released(self) -> None:
        """Free the slots of retired, unpinned versions (blocks on the engine lock: not on the loop)."""
        with self._lock:
            pending, self._to_unload = self._to_unload, []
        for tv in pending:
            if tv.resident is not None:
                self._engine.unload(tv.resident.slot)
                tv.resident = None
        self._metrics.resident_adapters.set(self._engine.resident_tasks)
        self._metrics.resident_bytes.set(self._engine.resident_bytes)
        self._metrics.registered_tasks.set(len(self._tasks))

    def _retire(self, tv: TaskVersion) -> None:
        tv.retired = True
        if tv.pins == 0:
            self._to_unload.append(tv)
