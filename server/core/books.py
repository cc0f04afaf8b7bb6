"""The one record of task slots: which slot holds what, what it costs against the byte budget, which
pools it uses, who it is held for and the order slots were last used in (for LRU eviction).

The in-process engine and the worker-process engine's books in the scheduler both keep theirs here,
and the registry reads residency and eviction order from the same object instead of a copy.
"""

from __future__ import annotations

import heapq
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass


class CapacityError(RuntimeError):
    """Loading would exceed the adapter byte budget."""


@dataclass
class Booking:
    slot: int
    nbytes: int
    pools: tuple[Hashable, ...] = ()
    outside_budget: bool = False  # a built-in task of the server's: neither counted nor evictable
    sha256: str | None = None  # content hash in the store (a restarted worker is replayed by it)
    blob: bytes | None = None  # kept only for a task with no hash to re-read it by
    holder: object = None  # what the slot is held for (the registry's version); None: not evictable


class BooksView:
    """An engine's counts, read from its books (the in-process engine, the worker-process engine's
    books, a test's fake engine)."""

    books: SlotBooks

    @property
    def resident_tasks(self) -> int:
        """Resident adapters (built-in tasks outside the budget not counted)."""
        return self.books.resident_tasks

    @property
    def resident_bytes(self) -> int:
        """Bytes counted against the budget."""
        return self.books.resident_bytes

    @property
    def pool_count(self) -> int:
        return self.books.pool_count


class SlotBooks:
    """Task slots (1, 2, …; 0 is the identity) booked against `max_bytes`. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._bookings: OrderedDict[int, Booking] = OrderedDict()  # least recently used first
        self._free: list[int] = []  # a heap: the lowest freed slot is reused first
        self._next = 1
        self._lock = threading.Lock()

    def book(self, nbytes: int, pools: tuple[Hashable, ...] = (), *, slot: int | None = None,
             outside_budget: bool = False, sha256: str | None = None, blob: bytes | None = None) -> Booking:
        """Book a slot (any free one, or `slot` to mirror another process's books); CapacityError past the
        budget, ValueError for a slot that is taken."""
        with self._lock:
            if not outside_budget and self._in_budget() + nbytes > self.max_bytes:
                raise CapacityError(f"loading {nbytes} bytes would exceed the adapter budget of {self.max_bytes} bytes")
            if slot is None:
                slot = heapq.heappop(self._free) if self._free else self._take_next()
            elif slot < 1 or slot in self._bookings:
                raise ValueError(f"task slot {slot} is taken or invalid")
            else:
                while self._next <= slot:
                    heapq.heappush(self._free, self._take_next())
                self._free.remove(slot)
                heapq.heapify(self._free)
            booking = Booking(slot, nbytes, tuple(pools), outside_budget, sha256, blob)
            self._bookings[slot] = booking
            return booking

    def _take_next(self) -> int:
        slot, self._next = self._next, self._next + 1
        return slot

    def release(self, slot: int) -> Booking:
        with self._lock:
            booking = self._bookings.pop(slot)
            heapq.heappush(self._free, slot)
            return booking

    def hold(self, slot: int, holder: object) -> None:
        """Mark a slot as held for `holder` (which makes it a candidate for eviction) and most recent."""
        with self._lock:
            self._bookings[slot].holder = holder
            self._bookings.move_to_end(slot)

    def touch(self, slot: int) -> None:
        """The slot was just used (cheap: per request)."""
        with self._lock:
            if slot in self._bookings:
                self._bookings.move_to_end(slot)

    def least_recent(self, evictable: Callable[[object], bool]) -> Booking | None:
        """The least recently used held booking whose holder `evictable` accepts."""
        with self._lock:
            return next((b for b in self._bookings.values() if b.holder is not None and evictable(b.holder)), None)

    def evictable_bytes(self, evictable: Callable[[object], bool]) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._bookings.values() if b.holder is not None and evictable(b.holder))

    def held(self) -> list[object]:
        """Holders of held slots, least recently used first."""
        with self._lock:
            return [b.holder for b in self._bookings.values() if b.holder is not None]

    def by_slot(self) -> list[Booking]:
        with self._lock:
            return sorted(self._bookings.values(), key=lambda b: b.slot)

    def __contains__(self, slot: int) -> bool:
        return slot in self._bookings

    def pools_of(self, slot: int) -> tuple[Hashable, ...]:
        with self._lock:
            return self._bookings[slot].pools

    def _in_budget(self) -> int:
        return sum(b.nbytes for b in self._bookings.values() if not b.outside_budget)

    @property
    def resident_tasks(self) -> int:
        """Booked tasks counted against the budget."""
        with self._lock:
            return sum(not b.outside_budget for b in self._bookings.values())

    @property
    def resident_bytes(self) -> int:
        """Bytes counted against the budget."""
        with self._lock:
            return self._in_budget()

    @property
    def pool_count(self) -> int:
        with self._lock:
            return len({key for b in self._bookings.values() for key in b.pools})
