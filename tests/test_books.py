"""The slot books: numbering, the byte budget and LRU order, which the engines and the registry share."""

import pytest

from switchboard.server.core.books import CapacityError, SlotBooks


def test_budget_counts_only_in_budget_bookings_and_refuses_past_it():
    books = SlotBooks(100)
    a = books.book(60, ("p1", "p2"))
    builtin = books.book(500, ("p3",), outside_budget=True)  # a built-in task: never counted
    assert (books.resident_tasks, books.resident_bytes, books.pool_count) == (1, 60, 3)
    with pytest.raises(CapacityError):
        books.book(41)
    books.book(40, ("p1",))
    assert books.resident_bytes == 100 and books.pool_count == 3
    books.release(a.slot)
    assert books.resident_bytes == 40 and a.slot not in books and builtin.slot in books


def test_lowest_free_slot_is_reused_and_a_mirrored_slot_is_exact():
    books = SlotBooks(1 << 20)
    slots = [books.book(1).slot for _ in range(4)]
    assert slots == [1, 2, 3, 4]
    books.release(3)
    books.release(2)
    assert books.book(1).slot == 2
    assert books.book(1, slot=9).slot == 9  # a worker mirrors the scheduler's numbering
    assert books.book(1).slot == 3
    assert [books.book(1).slot for _ in range(5)] == [5, 6, 7, 8, 10]
    with pytest.raises(ValueError):
        books.book(1, slot=9)
    with pytest.raises(ValueError):
        books.book(1, slot=0)  # slot 0 is the identity


def test_eviction_order_is_least_recently_used_among_evictable_holders():
    books = SlotBooks(1 << 20)
    held = {}
    for name in "abcd":
        booking = books.book(10)
        books.hold(booking.slot, name)
        held[name] = booking.slot
    books.book(10)  # booked but not held (a trial load): never a victim
    books.touch(held["a"])
    pinned = {"b"}
    victim = books.least_recent(lambda h: h not in pinned)
    assert victim is not None and victim.holder == "c"
    assert books.evictable_bytes(lambda h: h not in pinned) == 30
    assert books.held() == ["b", "c", "d", "a"]
    assert books.least_recent(lambda h: False) is None
