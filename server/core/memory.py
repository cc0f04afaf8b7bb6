"""Returning freed heap memory to the OS (glibc). Python services with many threads keep freed
memory in per-thread malloc arenas; fewer arenas and an occasional trim keep RSS close to what is in
use. No-ops where the C library lacks these calls."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
from collections.abc import Callable

M_ARENA_MAX = -8  # mallopt parameter


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")  # runs ldconfig: once
    return ctypes.CDLL(name) if name else None


def trim() -> None:
    """Hand free heap pages of every arena back to the OS."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def limit_arenas(count: int = 2) -> None:
    """Fewer malloc arenas: call before the worker threads start allocating."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_ARENA_MAX, count)


def periodic_trim(every_s: float = 10.0) -> Callable[[], None]:
    """A function that trims at most once per `every_s` (for housekeeping loops)."""
    last = time.monotonic()

    def maybe_trim() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            trim()

    return maybe_trim
