"""Dynamic mixed-task batching: an asyncio front and one inference worker thread.

Requests wait in one FIFO per tenant, cut into chunks of at most `max_chunk_tokens` (one row at
least); the worker fills each batch chunk by chunk in the order the scheduler gives (VTC across
tenants, scheduler.py), charging each chunk as it is dispatched. A batch closes when the next chunk
would pass the row limit or the token budget (rows × padded length; while several tenants are
active, and under overload, also a time budget), or `batch_wait_ms` after the worker started
collecting. So a 64-row request of long texts is many short scheduling steps, and another tenant's
request waits for at most one batch, not for the whole of it. A request is answered once its last
chunk is computed. Requests past their deadline or whose client left are dropped before
inference. Whether a request may queue at all is admission's call (admission.py): refused at once
with 429 and a `Retry-After`, rather than queued to time out later with a 503.

The batcher owns each submitted request's lease from `submit` on and releases it exactly once: when
the request is refused, dropped, or its forward pass is over — before the answer is delivered.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from switchboard.server.errors import DeadlineExceeded, Overloaded
from switchboard.server.metrics import Metrics
from switchboard.server.runtime.admission import Admission, Refusal
from switchboard.server.runtime.lease import Lease
from switchboard.server.runtime.scheduler import TenantQueues
from switchboard.server.settings import Settings

log = logging.getLogger(__name__)


class ForwardEngine(Protocol):
    """What the batcher needs from the engine (tests drive it with a fake)."""

    pad_id: int

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                task_slots: torch.Tensor) -> torch.Tensor: ...

    def chunks(self, attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, int]]: ...


def parallelism(engine: object) -> int:
    """How many batches the engine runs at once (engine worker processes; 1 for an in-process engine)."""
    return int(getattr(engine, "parallelism", 1))


@dataclass
class WorkItem:
    """One submitted request: its future, leases and deadline. It is queued as chunks (below) and
    answered when every chunk is computed or, at the first failure or drop, when none is in flight."""

    tenant: str
    slots: np.ndarray  # [rows]: each row's engine slot, resident while the leases are held
    leases: list[Lease]  # owned by the batcher: each released exactly once, after the forward or on a drop
    input_ids: np.ndarray  # [rows, length], right-padded with pad_id
    attention_mask: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float
    deadline: float
    pending: int = 0  # chunks queued or in flight
    parts: list[torch.Tensor | None] = field(default_factory=list)  # each chunk's logits, in row order
    error: BaseException | None = None  # set at the first failure or drop: the other chunks are dropped

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

    def release(self) -> None:
        for lease in self.leases:
            lease.release()


@dataclass
class Chunk:
    """Rows [start, stop) of a request, trimmed to their own longest row: the scheduler's grain."""

    item: WorkItem
    index: int
    start: int
    stop: int
    length: int
    cost: int
    seq: int = 0

    @property
    def tenant(self) -> str:
        return self.item.tenant

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def tokens(self) -> int:
        return self.rows * self.length


def cut(item: WorkItem, max_chunk_tokens: int, load_charge: int = 0) -> list[Chunk]:
    """The item's chunks: as many rows as fit `max_chunk_tokens` at the item's padded length (one at
    least), each trimmed to its longest row. A cold load's charge goes on the first chunk."""
    per_chunk = max(1, max_chunk_tokens // max(1, item.length))
    if per_chunk >= item.rows:  # one chunk (most requests): rows are padded to their longest, no array work
        length = max(1, item.length)
        item.pending, item.parts = 1, [None]
        return [Chunk(item, 0, 0, item.rows, length, item.rows * length + load_charge)]
    starts = np.arange(0, item.rows, per_chunk)
    lengths = np.maximum.reduceat(np.count_nonzero(item.attention_mask, axis=1), starts)
    stops = [*starts[1:].tolist(), item.rows]
    chunks = [Chunk(item, i, a, b, max(1, n), (b - a) * max(1, n) + (load_charge if i == 0 else 0))
              for i, (a, b, n) in enumerate(zip(starts.tolist(), stops, lengths.tolist()))]
    item.pending, item.parts = len(chunks), [None] * len(chunks)
    return chunks


def _resolve(item: WorkItem, result: object = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if item.future.done():
            return
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(result)

    item.loop.call_soon_threadsafe(settle)


class Batcher:
    def __init__(self, engine: ForwardEngine, settings: Settings, metrics: Metrics,
                 after_batch: Callable[[], None] = lambda: None) -> None:
        """after_batch: housekeeping run by the worker between batches (unloading retired versions)."""
        self._engine = engine
        self._settings = settings
        self._metrics = metrics
        self._after_batch = after_batch
        self._queues = TenantQueues(settings.scheduler)
        self.admission = Admission(settings)
        self._throttled: dict[str, tuple[float, int]] = {}  # tenant → (until, Retry-After) after a refusal
        self._active: OrderedDict[str, float] = OrderedDict()  # tenant → its last submit, oldest first
        self._cond = threading.Condition()
        self._stopping = False
        # one worker thread per batch the engine can run at once: each takes the next batch when its
        # engine worker is free, so N worker processes compute N batches side by side
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"switchboard-inference-{i}",
                                          daemon=True) for i in range(parallelism(engine))]
        self._started: dict[int, float] = {}  # worker index → when its batch in flight started
        self.pad_id = int(engine.pad_id)

    @property
    def drain(self):  # noqa: ANN201 - the admission's drain rate (tests and start-up seed it)
        return self.admission.drain

    @property
    def overloaded(self) -> bool:
        with self._cond:
            return self.admission.overloaded(self._queues)

    def queued_rows(self, tenant: str) -> int:
        with self._cond:
            return self._queues.rows[tenant]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def running(self) -> bool:
        return all(t.is_alive() for t in self._threads) and not self._stopping

    def stop(self, timeout: float = 30.0) -> None:
        """Finish every admitted request, then stop the workers."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))

    # ----- admission (event loop) ---------------------------------------------------------------------
    def precheck(self, tenant: str, max_queued_rows: int, rows: int = 0, min_tokens: int = 0) -> None:
        """Refuse now (429) if the request would be refused even at its least possible size (`rows`, and
        `min_tokens` padded tokens: a lower bound from the texts). Called before a request is tokenized,
        so shed work — a flooder's 64 long texts — costs almost nothing."""
        with self._cond:
            refusal = self.admission.refusal(self._queues, tenant, rows, min_tokens, max_queued_rows)
        if refusal is not None:
            self._refuse(tenant, refusal)

    def throttled(self, tenant: str) -> int | None:
        """Retry-After if this tenant was refused a moment ago: its next requests are refused before
        their bodies are even read (the HTTP edge's fast path), so a flood costs little CPU."""
        until, retry = self._throttled.get(tenant, (0.0, 0))
        if time.monotonic() < until:
            self._metrics.dropped.labels("throttled").inc()
            self._metrics.tenant_throttled.labels(tenant).inc()
            return retry
        return None

    def throttle_window(self, tenant: str) -> float:
        """Seconds left in this tenant's throttle (0: none); counts nothing (another front applies it)."""
        return max(0.0, self._throttled.get(tenant, (0.0, 0))[0] - time.monotonic())

    def _refuse(self, tenant: str, refusal: Refusal) -> None:
        self._metrics.dropped.labels(refusal.reason).inc()
        self._metrics.tenant_throttled.labels(tenant).inc()
        if refusal.reason in ("queue_delay", "tenant_queue_full"):  # this tenant's demand, not a full queue
            window = min(refusal.seconds, self._settings.throttle_window_ms / 1000)
            self._throttled[tenant] = (time.monotonic() + window, refusal.retry_after)
        raise Overloaded(f"{refusal.message}; retry in {refusal.retry_after} s",
                         {"Retry-After": str(refusal.retry_after)})

    def submit(self, lease: Lease | list[Lease], input_ids: np.ndarray, attention_mask: np.ndarray,
               timeout_s: float, *, tenant: str, max_queued_rows: int, cold_load: bool = False) -> WorkItem:
        """Queue one request's rows (call on the event loop). Takes ownership of the lease(s) — the caller
        hands each over with `lease.transfer()` — whose versions must be resident. With several leases
        (one text under many tasks), the rows are the texts repeated once per lease, in lease order, and
        they run in the same forward pass. Raises Overloaded."""
        leases = lease if isinstance(lease, list) else [lease]
        slots = [held.slot for held in leases]
        if any(slot is None for slot in slots) or input_ids.shape[0] % len(leases):
            for held in leases:
                held.release()
            raise RuntimeError("submit needs resident task versions and rows for each")
        per_lease = input_ids.shape[0] // len(leases)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        item = WorkItem(tenant, np.repeat(np.array(slots, dtype=np.int64), per_lease), leases, input_ids,
                        attention_mask, loop.create_future(), loop, now, now + timeout_s)
        load_charge = self._settings.vtc_load_charge_tokens if cold_load else 0
        chunks = cut(item, self._settings.max_chunk_tokens, load_charge)
        tokens = sum(chunk.tokens for chunk in chunks)
        with self._cond:
            if self._stopping:
                item.release()
                raise Overloaded("server is shutting down", {"Retry-After": str(self._settings.retry_after_s)})
            refusal = self.admission.refusal(self._queues, tenant, item.rows, tokens, max_queued_rows)
            if refusal is not None:
                item.release()
                self._refuse(tenant, refusal)
            for chunk in chunks:
                self._queues.push(chunk)
            self.admission.admitted(tokens)
            self._active[tenant] = now
            self._active.move_to_end(tenant)
            self._gauges()
            self._cond.notify(len(chunks))
        self._metrics.tenant_requests.labels(tenant).inc()
        return item

    async def result(self, item: WorkItem) -> torch.Tensor:
        """The item's logits [rows, C_max]; DeadlineExceeded past its deadline. Cancelling this (the
        client left) cancels the item: the worker drops it unless its forward already started."""
        timeout_s = item.deadline - item.enqueued

        def expire() -> None:  # a timer, not wait_for + shield: two fewer tasks per request
            if not item.future.done():
                item.future.set_exception(DeadlineExceeded(f"request did not finish within {timeout_s:.1f} s"))

        timer = item.loop.call_later(max(0.0, timeout_s) + 1.0, expire)
        try:
            return await item.future  # cancelling this task cancels the item's future: the worker drops it
        finally:
            timer.cancel()

    def _gauges(self) -> None:
        """Queue totals; called with the condition held."""
        self._metrics.queue_depth.set(self._queues.total_rows)
        self._metrics.queue_tokens.set(self._queues.total_tokens)

    # ----- worker thread -----------------------------------------------------------------------------
    def _contended(self, now: float) -> bool:
        """Two or more tenants have work waiting or sent some within `fair_window_s` (a flooder's one huge
        request may have been sent long ago; a light tenant's last one a moment ago). Called with the
        condition held."""
        horizon = now - self._settings.fair_window_s
        while self._active and next(iter(self._active.values())) < horizon:
            self._active.popitem(last=False)
        if len(self._active) > 1:
            return True
        return len(set(self._active).union(self._queues.backlogged)) > 1

    def _stagger(self, index: int, now: float) -> float:
        """How long worker `index` should hold off before taking the next chunk, so that the workers' batches
        start spread over a batch's length rather than together: then one of them is always about to be
        free, and a light tenant's request waits at most a share of a batch, not a whole one. While it holds
        off, a short chunk (another tenant's one text) needs no spread and is taken at once; batches
        shorter than a quarter of `fair_batch_ms` are never held (holding them would cost throughput for
        little). Called with the condition held, only while several tenants are active."""
        head, workers = self._queues.peek(), len(self._threads)
        rate = self.admission.worker_rate(workers)
        others = [at for i, at in self._started.items() if i != index]
        if head is None or not rate or not others:
            return 0.0
        length = head.tokens / rate
        if length < self._settings.fair_batch_ms / 4000:  # a short batch: waiting for one costs little anyway
            return 0.0
        return max(0.0, max(others) + length / workers - now)

    def _take(self, index: int = 0) -> list[Chunk]:
        """Collect one batch in the scheduler's order (called with no lock held)."""
        s = self._settings
        batch: list[Chunk] = []
        rows = width = 0
        with self._cond:
            while True:
                while not self._queues and not self._stopping:
                    self._cond.wait()
                contended = self._contended(time.monotonic())
                spread = contended and s.fair_batch_ms > 0 and not self._stopping
                hold = self._stagger(index, time.monotonic()) if spread else 0.0
                if hold <= 0:
                    break
                self._cond.wait(hold)  # a new arrival wakes this worker early: it may be a short chunk
            limits = self.admission.batch_limits(self._queues, len(self._threads), contended)
            max_rows, max_tokens = limits.rows, limits.tokens
            log.debug("taking a batch: contended %s, at most %d rows, %d tokens", contended, max_rows, max_tokens)
            close_at = time.monotonic() + s.batch_wait_ms / 1000.0
            while True:
                full = False
                while (chunk := self._queues.peek()) is not None:
                    if self._drop(chunk):  # dead requests neither count toward nor close a batch
                        self._queues.pop(chunk, charge=False)
                        self._finish_chunk(chunk)
                        continue
                    new_rows, new_width = rows + chunk.rows, max(width, chunk.length)
                    if batch and (new_rows > max_rows or new_rows * new_width > max_tokens):
                        full = True
                        break
                    self._queues.pop(chunk)
                    batch.append(chunk)
                    rows, width = new_rows, new_width
                self._gauges()
                remaining = close_at - time.monotonic()
                if full or remaining <= 0 or self._stopping:
                    # requests whose client left or whose deadline passed while we collected
                    kept = []
                    for chunk in batch:
                        if self._drop(chunk):
                            self._finish_chunk(chunk)
                        else:
                            kept.append(chunk)
                    self.admission.inflight_tokens += sum(chunk.tokens for chunk in kept)
                    if kept:
                        self._started[index] = time.monotonic()
                    for tenant in {chunk.tenant for chunk in kept}:
                        self._metrics.tenant_vtc.labels(tenant).set(self._queues.counters.get(tenant, 0.0))
                    return kept
                self._cond.wait(remaining)

    def _drop(self, chunk: Chunk) -> bool:
        """Whether a chunk's request is dead: its client left, its deadline passed, or another of its
        chunks failed. The first drop of a request is counted and decides its error."""
        item = chunk.item
        if item.error is not None:
            return True
        reason = None
        if item.future.cancelled():
            reason = "client_gone"
        elif time.monotonic() > item.deadline:
            reason = "deadline"
        if reason is None:
            return False
        self._metrics.dropped.labels(reason).inc()
        item.error = DeadlineExceeded("request waited past its deadline") if reason == "deadline" else (
            asyncio.CancelledError())
        return True

    def _finish_chunk(self, chunk: Chunk, logits: torch.Tensor | None = None) -> None:
        """One chunk is computed (`logits`) or dropped; the request's last one releases its leases —
        before its answer is delivered, so an answered request never still holds its version — and
        answers it (called with the condition held, or by the worker that computed the chunk)."""
        item = chunk.item
        item.parts[chunk.index] = logits
        item.pending -= 1
        if item.pending:
            return
        item.release()
        if item.error is not None:
            if not isinstance(item.error, asyncio.CancelledError):
                _resolve(item, error=item.error)
        else:
            parts = item.parts
            _resolve(item, result=parts[0] if len(parts) == 1 else torch.cat(parts))  # type: ignore[arg-type]
        item.parts = []

    def _run(self, index: int = 0) -> None:
        while True:
            with self._cond:
                if self._stopping and not self._queues:
                    return
            batch = self._take(index)
            if not batch:
                continue
            outcome: list[torch.Tensor] | BaseException
            try:
                outcome = self._run_batch(batch)
            except Exception as exc:  # surfaced to every request of the batch as a 500
                log.exception("forward pass failed for a batch of %d chunks (%d rows); answering 500",
                              len(batch), sum(c.rows for c in batch))
                outcome = exc
            with self._cond:
                self._started.pop(index, None)
                tokens = sum(chunk.tokens for chunk in batch)
                self.admission.inflight_tokens -= tokens
                self.admission.completed(tokens)
                for i, chunk in enumerate(batch):
                    if isinstance(outcome, BaseException):
                        chunk.item.error = chunk.item.error or outcome
                        self._finish_chunk(chunk)
                    else:
                        self._finish_chunk(chunk, outcome[i])
            try:
                self._after_batch()
            except Exception:  # housekeeping must never stop the worker
                log.exception("housekeeping after a batch failed; the worker goes on")

    def _run_batch(self, batch: list[Chunk]) -> list[torch.Tensor]:
        """Each chunk's logits, in order, or raises; releasing the leases is the caller's job."""
        start = time.monotonic()
        rows = sum(c.rows for c in batch)
        width = max(c.length for c in batch)
        ids = np.full((rows, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((rows, width), dtype=np.int64)
        slots = np.empty(rows, dtype=np.int64)
        offset = 0
        for chunk in batch:  # a loop over chunks, copying whole blocks
            item, n, length = chunk.item, chunk.rows, chunk.length
            ids[offset:offset + n, :length] = item.input_ids[chunk.start:chunk.stop, :length]
            mask[offset:offset + n, :length] = item.attention_mask[chunk.start:chunk.stop, :length]
            slots[offset:offset + n] = item.slots[chunk.start:chunk.stop]
            offset += n
            if chunk.index == 0:
                self._metrics.queue_duration.observe(start - item.enqueued)
            self._metrics.tenant_rows.labels(item.tenant).inc(n)
            self._metrics.tenant_tokens.labels(item.tenant).inc(chunk.tokens)
        logits = self._engine.forward(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(slots))
        elapsed = time.monotonic() - start
        real_tokens = int(np.count_nonzero(mask))
        computed = sum(len(r) * w for r, w in self._engine.chunks(torch.from_numpy(mask)))
        # with N engine workers busy side by side the queue drains N batches per batch time
        self.admission.drain.observe(sum(c.tokens for c in batch) * len(self._threads), elapsed)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch: %d chunks of %s, %d rows × %d, %.3f s", len(batch),
                      sorted({c.tenant for c in batch}), rows, width, elapsed)
        m = self._metrics
        m.batches.inc()
        m.inference_duration.observe(elapsed)
        m.batch_rows.observe(rows)
        m.batch_tokens.observe(real_tokens)
        m.batch_padding.observe(1.0 - real_tokens / max(1, computed))
        m.batch_tasks.observe(len(np.unique(slots)))
        if self.admission.drain.tokens_per_s:
            m.drain_rate.set(self.admission.drain.tokens_per_s)
        return list(torch.split(logits, [c.rows for c in batch]))
