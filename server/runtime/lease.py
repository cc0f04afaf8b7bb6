"""A pin on one task version that travels with the work and is released exactly once (TEI's permit).

The registry hands out a lease per request; whoever holds it owns the pin. Handing the work to the
batcher moves the pin with `transfer()`, so the handler's `with lease:` no longer releases it and the
batcher releases it once the forward pass that reads the slot is over (or the work is dropped).
`release()` is idempotent: every path may call it, only the first call unpins.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from switchboard.adapter_store.records import VersionRecord


class Pinned(Protocol):
    """The registry's view of a version: what a lease reads while it holds the pin."""

    record: VersionRecord

    @property
    def slot(self) -> int | None: ...

    @property
    def temperature(self) -> float: ...


class Lease:
    __slots__ = ("_target", "_unpin", "_released", "_lock")

    def __init__(self, target: Pinned, unpin: Callable[[Pinned], None]) -> None:
        self._target = target
        self._unpin = unpin
        self._released = False
        self._lock = threading.Lock()

    @property
    def record(self) -> VersionRecord:
        """The immutable version this lease pins (task, version number, labels, …)."""
        return self._target.record

    @property
    def slot(self) -> int | None:
        """The engine slot while resident (it stays resident while pinned, once loaded)."""
        return self._target.slot

    @property
    def temperature(self) -> float:
        """The resident version's calibration temperature (1.0 until loaded)."""
        return self._target.temperature

    @property
    def pinned(self) -> Pinned:
        """The registry's own object behind the lease (only the registry looks inside)."""
        return self._target

    @property
    def released(self) -> bool:
        return self._released

    def _take(self) -> bool:
        with self._lock:
            if self._released:
                return False
            self._released = True
            return True

    def release(self) -> None:
        if self._take():
            self._unpin(self._target)

    def transfer(self) -> Lease:
        """Move the pin into a new lease (for the next owner); this one becomes inert."""
        if not self._take():
            raise RuntimeError("cannot transfer a released lease")
        return Lease(self._target, self._unpin)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class FixedSlot:
    """A pin target with a slot and no stored version: the built-in embedding task, an upload's canary
    trial. A lease on it releases nothing (`Lease(FixedSlot(slot), lambda _: None)`)."""

    record = None
    temperature = 1.0

    def __init__(self, slot: int) -> None:
        self._slot = slot

    @property
    def slot(self) -> int:
        return self._slot
