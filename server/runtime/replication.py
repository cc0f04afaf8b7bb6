"""Following a shared store: changes other replicas make become this replica's view.

The store reports each change (`Store.watch`, PostgreSQL LISTEN/NOTIFY); a task change re-reads that
task into the registry, a key or tenant change reloads them into tenancy, and `resync` (after a
reconnect) re-reads everything. Notifications can be lost (a dropped connection between a commit and
its delivery), so a shared store is also re-read whole every `store_resync_s`. The embedded SQLite
store is this process's alone and reports nothing.
"""

from __future__ import annotations

import logging
import threading

from switchboard.adapter_store.records import StoreChange, StoreUnavailable
from switchboard.adapter_store.store import Store
from switchboard.server.metrics import Metrics
from switchboard.server.runtime.registry import Registry
from switchboard.server.runtime.tenancy import Tenancy

log = logging.getLogger(__name__)


class StoreFollower:
    def __init__(self, store: Store, registry: Registry, tenancy: Tenancy, metrics: Metrics, resync_s: float) -> None:
        self._store = store
        self._registry = registry
        self._tenancy = tenancy
        self._metrics = metrics
        self._resync_s = resync_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def shared(self) -> bool:
        return self._store.url != "sqlite"

    def start(self) -> None:
        if not self.shared:
            return
        self._store.watch(self.apply)
        self._thread = threading.Thread(target=self._resync_loop, name="switchboard-resync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def apply(self, change: StoreChange) -> None:
        """One change (called on the store's listener thread)."""
        self._metrics.store_changes.labels(change.kind).inc()
        if change.kind == "task" and change.tenant and change.task:
            self._registry.refresh((change.tenant, change.task))
        elif change.kind in ("keys", "tenants"):
            self._tenancy.reload()
        elif change.kind == "resync":
            self.resync()

    def resync(self) -> None:
        changed = self._registry.resync()
        self._tenancy.reload()
        if changed:
            log.info("resync with the store at %s: %d tasks changed", self._store.url, changed)

    def _resync_loop(self) -> None:
        while not self._stop.wait(self._resync_s):
            try:
                self.resync()
            except StoreUnavailable:
                pass  # logged by the store; the listener reconnects and resyncs
            except Exception:  # noqa: BLE001 - the loop must survive to try again
                log.exception("periodic resync with the store failed")
