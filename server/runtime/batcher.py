"""Dynamic mixed-task batching: an asyncio front and one inference worker thread.

A batch closes when the next request would pass the row limit or the token budget (rows × padded
length), or `batch_wait_ms` after the worker started collecting; under overload also at a time budget
(`max_batch_ms` of tokens at the measured drain rate), so long inputs cannot make everyone wait for
long batches. Requests past their deadline or whose client left are dropped before inference.

Admission is by cost: the queue is bounded in rows and in tokens (rows × length), and by the wait a
new request would face — the tokens ahead of it divided by the drain rate the worker measures. Bursts
may queue up to `max_queue_delay_s`. Overload is demand above capacity: with requests waiting, the
tokens admitted per `queue_interval_ms` (decaying sums, no window) exceed `overload_factor` × the
larger of what the worker completed and its peak drain rate, after it completed some work (so a
client population starting at once is no surge). Under overload only work that would wait at most
`queue_target_ms` is admitted (CoDel's target, as Facebook's servers use it for admission), so
admitted requests stay fast while the excess is refused; overload lasts until a whole interval
passes with nothing shed and admitted demand back at capacity. Past any bound a
request is refused at once with 429 and a `Retry-After` computed from the drain rate, rather than
queued to time out later with a 503.

The batcher owns each submitted request's lease from `submit` on and releases it exactly once: when
the request is refused, dropped, or its forward pass is over — before the answer is delivered.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from switchboard.server.errors import DeadlineExceeded, Overloaded
from switchboard.server.metrics import Metrics
from switchboard.server.runtime.lease import Lease
from switchboard.server.settings import Settings

log = logging.getLogger(__name__)
MAX_RETRY_AFTER_S = 60


class ForwardEngine(Protocol):
    """What the batcher needs from the engine (tests drive it with a fake)."""

    pad_id: int

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                task_slots: torch.Tensor) -> torch.Tensor: ...

    def chunks(self, attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, int]]: ...


@dataclass
class WorkItem:
    slot: int  # the engine slot of the request's task version, resident while the lease is held
    lease: Lease  # owned by the batcher: released exactly once, after the forward or on a drop
    input_ids: np.ndarray  # [rows, length], right-padded with pad_id
    attention_mask: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float
    deadline: float

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def tokens(self) -> int:
        """What it costs the queue: rows × padded length."""
        return self.rows * self.length


def _resolve(item: WorkItem, result: object = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if item.future.done():
            return
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(result)

    item.loop.call_soon_threadsafe(settle)


class DrainRate:
    """Tokens per second the worker computes: an exponentially weighted mean over batches (what the
    queue drains at now), and its peak, held and decaying with a half-life of `peak_half_life_s` (what
    the engine can do: small batches under overload are slower per token, and capacity must not seem
    to shrink because of them)."""

    def __init__(self, weight: float = 0.2, peak_half_life_s: float = 60.0) -> None:
        self.weight = weight
        self.peak_half_life_s = peak_half_life_s
        self.tokens_per_s: float | None = None
        self._peak = 0.0
        self._peak_at = time.monotonic()

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        self.tokens_per_s = rate if self.tokens_per_s is None else (
            (1 - self.weight) * self.tokens_per_s + self.weight * rate)
        if self.tokens_per_s >= self.peak:
            self._peak, self._peak_at = self.tokens_per_s, time.monotonic()

    def assume(self, tokens_per_s: float) -> None:
        """Set the rate and its peak (tests and start-up measurements)."""
        self.tokens_per_s = self._peak = tokens_per_s
        self._peak_at = time.monotonic()

    @property
    def peak(self) -> float:
        return self._peak * 0.5 ** ((time.monotonic() - self._peak_at) / self.peak_half_life_s)

    def seconds_for(self, tokens: int, fallback: float) -> float:
        return tokens / self.tokens_per_s if self.tokens_per_s else fallback


class DecayingSum:
    """Σ tokens · exp(−age/τ): a rate times τ that needs no window, so arrivals that follow a batch's
    completions add to it as those completions do, however long the batch (a window would see one
    without the other)."""

    def __init__(self, tau: float) -> None:
        self.tau = tau
        self._value = 0.0
        self._at = time.monotonic()

    def value(self, now: float) -> float:
        return self._value * math.exp(-(now - self._at) / self.tau)

    def add(self, tokens: float, now: float) -> None:
        self._value = self.value(now) + tokens
        self._at = now


class Batcher:
    def __init__(self, engine: ForwardEngine, settings: Settings, metrics: Metrics,
                 after_batch: Callable[[], None] = lambda: None) -> None:
        """after_batch: housekeeping run by the worker between batches (unloading retired versions)."""
        self._engine = engine
        self._settings = settings
        self._metrics = metrics
        self._after_batch = after_batch
        self._queue: collections.deque[WorkItem] = collections.deque()
        self._queued_rows = 0
        self._queued_tokens = 0
        self._inflight_tokens = 0
        self.drain = DrainRate()
        self._overloaded = False
        self._shed_at = -math.inf  # last refusal of work the burst allowance would have admitted
        tau = settings.queue_interval_ms / 1000
        self._arrivals = DecayingSum(tau)  # tokens admitted
        self._completions = DecayingSum(tau)  # tokens computed
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="switchboard-inference", daemon=True)
        self.pad_id = int(engine.pad_id)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def stop(self, timeout: float = 30.0) -> None:
        """Finish every admitted request, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ----- admission (event loop) ---------------------------------------------------------------------
    def _refusal(self, item: WorkItem) -> tuple[str, str, float] | None:
        """(metric reason, message, seconds until it would fit) if the item must be refused."""
        s = self._settings
        if self._queued_rows + item.rows > s.max_queue_rows:
            excess = self._queued_rows + item.rows - s.max_queue_rows
            return "queue_full", f"queue is full ({self._queued_rows} rows waiting)", self._wait_for_rows(excess)
        if self._queued_tokens + item.tokens > s.max_queue_tokens and self._queued_tokens:
            excess = self._queued_tokens + item.tokens - s.max_queue_tokens
            return ("queue_full", f"queue is full ({self._queued_tokens} tokens waiting)",
                    self.drain.seconds_for(excess, s.retry_after_s))
        rate = self.drain.tokens_per_s
        if rate and self._queued_tokens:
            # Overloaded: the waiting room is held to the target (the batch in flight keeps the worker
            # busy meanwhile). Otherwise a burst may wait up to the cap, the batch in flight included.
            overloaded = self.overloaded
            if overloaded:
                wait, limit = self._queued_tokens / rate, s.queue_target_ms / 1000
            else:
                wait, limit = (self._queued_tokens + self._inflight_tokens) / rate, s.max_queue_delay_s
            if wait > limit:
                if overloaded:
                    self._shed_at = time.monotonic()
                state = "overloaded: " if overloaded else ""
                return ("queue_delay", f"{state}the queue would take {wait:.1f} s to reach this request "
                        f"(limit {limit:g} s)", wait - limit)
        return None

    @property
    def overloaded(self) -> bool:
        """Admitted demand above `overload_factor` × capacity enters overload; back at capacity leaves it."""
        with self._cond:  # re-entrant: admission and the worker call this with the lock held
            return self._update_overload()

    def _update_overload(self) -> bool:
        now, interval = time.monotonic(), self._settings.queue_interval_ms / 1000
        if not self.drain.tokens_per_s:
            return False
        completed = self._completions.value(now)
        capacity = max(completed, max(self.drain.peak, self.drain.tokens_per_s) * interval)
        demand = self._arrivals.value(now)
        was = self._overloaded
        if was:
            self._overloaded = demand > capacity or now - self._shed_at < interval
        else:
            # completions first: a client population starting at once, before anything finished, is no surge
            self._overloaded = (self._queued_rows > 0 and completed > 0.05 * capacity
                                and demand > self._settings.overload_factor * capacity)
        if self._overloaded != was:
            log.log(logging.WARNING if self._overloaded else logging.INFO,
                    "%s overload: %d tokens admitted per %.0f ms, %d completed, %d drainable; %d rows queued",
                    "entering" if self._overloaded else "leaving", demand, interval * 1000, completed,
                    self.drain.tokens_per_s * interval, self._queued_rows)
        return self._overloaded

    def _offered(self, tokens: int) -> None:
        """Record admitted demand (called with the condition held)."""
        self._arrivals.add(tokens, time.monotonic())

    def _wait_for_rows(self, rows: int) -> float:
        if not self._queued_rows:
            return float(self._settings.retry_after_s)
        return self.drain.seconds_for(rows * self._queued_tokens // self._queued_rows, self._settings.retry_after_s)

    def precheck(self) -> None:
        """Refuse now (429) if even the smallest request would be refused: the work already queued
        waits too long. Called before a request is tokenized, so shed work costs almost nothing."""
        with self._cond:
            probe = WorkItem(0, None, np.empty((1, 0), np.int64), np.empty((1, 0), np.int64),  # type: ignore[arg-type]
                             None, None, 0.0, 0.0)  # type: ignore[arg-type]
            refusal = self._refusal(probe)
        if refusal is not None:
            self._refuse(refusal)

    def _refuse(self, refusal: tuple[str, str, float]) -> None:
        reason, message, seconds = refusal
        self._metrics.dropped.labels(reason).inc()
        retry = min(MAX_RETRY_AFTER_S, max(1, math.ceil(seconds)))
        raise Overloaded(f"{message}; retry in {retry} s", {"Retry-After": str(retry)})

    def submit(self, lease: Lease, input_ids: np.ndarray, attention_mask: np.ndarray, timeout_s: float) -> WorkItem:
        """Queue one request's rows (call on the event loop). Takes ownership of the lease — the caller
        hands it over with `lease.transfer()` — whose version must be resident. Raises Overloaded."""
        slot = lease.slot
        if slot is None:
            lease.release()
            raise RuntimeError("submit needs a resident task version")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        item = WorkItem(slot, lease, input_ids, attention_mask, loop.create_future(), loop, now, now + timeout_s)
        with self._cond:
            if self._stopping:
                lease.release()
                raise Overloaded("server is shutting down", {"Retry-After": str(self._settings.retry_after_s)})
            refusal = self._refusal(item)
            if refusal is not None:
                lease.release()
                self._refuse(refusal)
            self._offered(item.tokens)
            self._queue.append(item)
            self._account(item, +1)
            self._cond.notify()
        return item

    async def result(self, item: WorkItem) -> torch.Tensor:
        """The item's logits [rows, C_max]; DeadlineExceeded past its deadline. Cancelling this (the
        client left) cancels the item: the worker drops it unless its forward already started."""
        timeout_s = item.deadline - item.enqueued
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), timeout=max(0.0, timeout_s) + 1.0)
        except TimeoutError as exc:
            item.future.cancel()
            raise DeadlineExceeded(f"request did not finish within {timeout_s:.1f} s") from exc
        except asyncio.CancelledError:
            item.future.cancel()
            raise

    def _account(self, item: WorkItem, sign: int) -> None:
        """Queue totals and gauges; called with the condition held."""
        self._queued_rows += sign * item.rows
        self._queued_tokens += sign * item.tokens
        self._metrics.queue_depth.set(self._queued_rows)
        self._metrics.queue_tokens.set(self._queued_tokens)

    # ----- worker thread -----------------------------------------------------------------------------
    def _take(self) -> list[WorkItem]:
        """Collect one batch (called with no lock held)."""
        s = self._settings
        batch: list[WorkItem] = []
        rows = width = 0
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            max_tokens = s.max_batch_tokens
            if s.max_batch_ms > 0 and self.drain.tokens_per_s and self._update_overload():
                max_tokens = min(max_tokens, int(self.drain.tokens_per_s * s.max_batch_ms / 1000))
            close_at = time.monotonic() + s.batch_wait_ms / 1000.0
            while True:
                full = False
                while self._queue:
                    item = self._queue[0]
                    if self._drop(item):  # dead requests neither count toward nor close a batch
                        self._queue.popleft()
                        self._account(item, -1)
                        continue
                    new_rows, new_width = rows + item.rows, max(width, item.length)
                    if batch and (new_rows > s.max_batch_rows or new_rows * new_width > max_tokens):
                        full = True
                        break
                    self._queue.popleft()
                    self._account(item, -1)
                    batch.append(item)
                    rows, width = new_rows, new_width
                remaining = close_at - time.monotonic()
                if full or remaining <= 0 or self._stopping:
                    # requests whose client left or whose deadline passed while we collected
                    batch = [item for item in batch if not self._drop(item)]
                    self._inflight_tokens = sum(item.tokens for item in batch)
                    return batch
                self._cond.wait(remaining)

    def _drop(self, item: WorkItem) -> bool:
        """Drop (and release) a request whose client left or whose deadline passed."""
        reason = None
        if item.future.cancelled():
            reason = "client_gone"
        elif time.monotonic() > item.deadline:
            reason = "deadline"
        if reason is None:
            return False
        self._metrics.dropped.labels(reason).inc()
        item.lease.release()
        if reason == "deadline":
            _resolve(item, error=DeadlineExceeded("request waited past its deadline"))
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping and not self._queue:
                    return
            batch = self._take()
            if not batch:
                continue
            outcome: list[torch.Tensor] | BaseException
            try:
                outcome = self._run_batch(batch)
            except Exception as exc:  # surfaced to every request of the batch as a 500
                log.exception("forward pass failed for a batch of %d requests (%d rows); answering 500",
                              len(batch), sum(i.rows for i in batch))
                outcome = exc
            finally:
                # The forward is over: release before answering, so an answered request never
                # still holds its version (the slot may be unloaded from here on).
                for item in batch:
                    item.lease.release()
                with self._cond:
                    self._inflight_tokens = 0
                    self._completions.add(sum(item.tokens for item in batch), time.monotonic())
            for i, item in enumerate(batch):
                if isinstance(outcome, BaseException):
                    _resolve(item, error=outcome)
                else:
                    _resolve(item, result=outcome[i])
            try:
                self._after_batch()
            except Exception:  # housekeeping must never stop the worker
                log.exception("housekeeping after a batch failed; the worker goes on")

    def _run_batch(self, batch: list[WorkItem]) -> list[torch.Tensor]:
        """Each item's logits, in order, or raises; releasing the leases is the caller's job."""
        start = time.monotonic()
        rows = sum(i.rows for i in batch)
        width = max(i.length for i in batch)
        ids = np.full((rows, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((rows, width), dtype=np.int64)
        slots = np.empty(rows, dtype=np.int64)
        offset = 0
        for item in batch:  # a loop over requests, copying whole blocks
            n = item.rows
            ids[offset:offset + n, : item.length] = item.input_ids
            mask[offset:offset + n, : item.length] = item.attention_mask
            slots[offset:offset + n] = item.slot
            offset += n
            self._metrics.queue_duration.observe(start - item.enqueued)
        logits = self._engine.forward(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(slots))
        elapsed = time.monotonic() - start
        real_tokens = int(mask.sum())
        computed = sum(len(r) * w for r, w in self._engine.chunks(torch.from_numpy(mask)))
        self.drain.observe(sum(item.tokens for item in batch), elapsed)
        m = self._metrics
        m.batches.inc()
        m.inference_duration.observe(elapsed)
        m.batch_rows.observe(rows)
        m.batch_tokens.observe(real_tokens)
        m.batch_padding.observe(1.0 - real_tokens / max(1, computed))
        m.batch_tasks.observe(len(np.unique(slots)))
        if self.drain.tokens_per_s:
            m.drain_rate.set(self.drain.tokens_per_s)
        return list(torch.split(logits, [item.rows for item in batch]))
