"""Bounded thread pools, one per kind of blocking work, so one kind cannot starve another.

Tokenizing requests and loading evicted adapters (the request path) run on one pool; parsing and
storing uploads on another. A pool refuses work past `max_pending` (429) instead of queueing it
without limit. The caller's context (its request id) travels into the thread.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from switchboard.server.errors import Overloaded
from switchboard.server.metrics import Metrics

T = TypeVar("T")


class BoundedExecutor:
    def __init__(self, name: str, workers: int, max_pending: int, metrics: Metrics, retry_after_s: int = 1) -> None:
        self.name = name
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"switchboard-{name}")
        self._pending = 0  # touched on the event loop only
        self._gauge = metrics.executor_pending.labels(name)
        self._retry_after = str(retry_after_s)

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self._pending >= self.max_pending:
            raise Overloaded(f"{self._pending} {self.name} jobs already running or waiting; retry later",
                             {"Retry-After": self._retry_after})
        self._pending += 1
        self._gauge.set(self._pending)
        context = contextvars.copy_context()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, context.run, fn, *args)
        finally:
            self._pending -= 1
            self._gauge.set(self._pending)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
