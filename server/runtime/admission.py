"""Admission by cost: whether a request may join the queue, decided before it waits.

The queue is bounded in rows and tokens (rows × length) — overall and per tenant (a tenant's
`max_queued_rows` quota, and tokens in the same proportion) — and by the wait a request would face:
the tokens ahead of it divided by the drain rate the worker measures. Under VTC a tenant waits for
its own queue and a fair share of everyone else's, so its wait is estimated from its own tokens times
the number of backlogged tenants. Bursts may wait up to `max_queue_delay_s`. Overload is demand above
capacity: with requests waiting, the tokens admitted per `queue_interval_ms` (decaying sums, no
window) exceed `overload_factor` × the larger of what the worker completed and its peak drain rate,
after it completed some work (so a client population starting at once is no surge). Under overload
only work that would wait at most `queue_target_ms` is admitted (CoDel's target, as Facebook's
servers use it for admission) and batches are bounded in time, so admitted requests stay fast while
the excess is refused; overload lasts until a whole interval passes with nothing shed and admitted
demand back at capacity. A refusal carries `Retry-After` computed from the drain rate.

Called with the batcher's lock held.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from switchboard.server.runtime.scheduler import TenantQueues
from switchboard.server.settings import Settings

log = logging.getLogger(__name__)
MAX_RETRY_AFTER_S = 60


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


@dataclass(frozen=True)
class Refusal:
    reason: str  # metric label: queue_full, tenant_queue_full, queue_delay
    message: str
    seconds: float  # until it would fit, from the drain rate

    @property
    def retry_after(self) -> int:
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(self.seconds)))


@dataclass(frozen=True)
class BatchLimits:
    rows: int
    tokens: int


class Admission:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.drain = DrainRate()
        self.inflight_tokens = 0
        self._overloaded = False
        self._shed_at = -math.inf  # last refusal of work the burst allowance would have admitted
        tau = settings.queue_interval_ms / 1000
        self._arrivals = DecayingSum(tau)  # tokens admitted
        self._completions = DecayingSum(tau)  # tokens computed

    def admitted(self, tokens: int) -> None:
        self._arrivals.add(tokens, time.monotonic())

    def completed(self, tokens: int) -> None:
        self._completions.add(tokens, time.monotonic())

    def refusal(self, queues: TenantQueues, tenant: str, rows: int, tokens: int,
                max_queued_rows: int) -> Refusal | None:
        """Why a request of `rows` × `tokens` for `tenant` may not join the queue now, if it may not."""
        s = self.settings
        if queues.total_rows + rows > s.max_queue_rows:
            excess = queues.total_rows + rows - s.max_queue_rows
            return Refusal("queue_full", f"queue is full ({queues.total_rows} rows waiting)",
                           self._seconds_for_rows(queues, excess))
        if queues.total_tokens + tokens > s.max_queue_tokens and queues.total_tokens:
            return Refusal("queue_full", f"queue is full ({queues.total_tokens} tokens waiting)",
                           self.drain.seconds_for(queues.total_tokens + tokens - s.max_queue_tokens,
                                                  s.retry_after_s))
        tenant_rows, tenant_tokens = queues.rows[tenant], queues.tokens[tenant]
        max_tokens = max_queued_rows * s.max_queue_tokens // max(1, s.max_queue_rows)
        if tenant_rows + rows > max_queued_rows or (tenant_tokens and tenant_tokens + tokens > max_tokens):
            return Refusal("tenant_queue_full", f"this tenant already has {tenant_rows} rows waiting "
                           f"(its quota: max_queued_rows {max_queued_rows})",
                           self.drain.seconds_for(tenant_tokens, s.retry_after_s))
        # what the engine can do (its recent peak), not only the last batches' mean: after a run of one-row
        # batches the mean is a fraction of capacity, and a big batch then in flight seemed to hold every
        # other tenant for many seconds (issue 21: a victim refused after a quiet spell of small requests)
        rate = max(self.drain.tokens_per_s or 0.0, self.drain.peak)
        if rate and queues.total_tokens:
            overloaded = self.overloaded(queues)
            # the work that would run before this tenant's request (under VTC: not a flooder's whole backlog)
            ahead = queues.ahead_of(tenant)
            if overloaded:  # the waiting room is held to the target; the batch in flight keeps the worker busy
                wait, limit = ahead / rate, s.queue_target_ms / 1000
            else:
                wait, limit = (ahead + self.inflight_tokens) / rate, s.max_queue_delay_s
            if wait > limit:
                if overloaded:
                    self._shed_at = time.monotonic()
                state = "overloaded: " if overloaded else ""
                return Refusal("queue_delay", f"{state}the queue would take {wait:.1f} s to reach this request "
                               f"(limit {limit:g} s)", wait - limit)
        return None

    def _seconds_for_rows(self, queues: TenantQueues, rows: int) -> float:
        if not queues.total_rows:
            return float(self.settings.retry_after_s)
        return self.drain.seconds_for(rows * queues.total_tokens // queues.total_rows, self.settings.retry_after_s)

    def overloaded(self, queues: TenantQueues) -> bool:
        """Admitted demand above `overload_factor` × capacity enters overload; leaving needs an interval
        with nothing shed and demand back at capacity."""
        now, interval = time.monotonic(), self.settings.queue_interval_ms / 1000
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
            self._overloaded = (bool(queues) and completed > 0.05 * capacity
                                and demand > self.settings.overload_factor * capacity)
        if self._overloaded != was:
            log.log(logging.WARNING if self._overloaded else logging.INFO,
                    "%s overload: %d tokens admitted per %.0f ms, %d completed, %d drainable; %d rows queued",
                    "entering" if self._overloaded else "leaving", demand, interval * 1000, completed,
                    self.drain.tokens_per_s * interval, queues.total_rows)
        return self._overloaded

    def worker_rate(self, workers: int) -> float:
        """Tokens per second one of `workers` engine workers computes at the engine's peak (0 before any)."""
        if not self.drain.tokens_per_s:
            return 0.0
        return max(self.drain.peak, self.drain.tokens_per_s) / max(1, workers)

    def batch_limits(self, queues: TenantQueues, workers: int = 1, contended: bool = False) -> BatchLimits:
        """How large the next batch may be — the one place that decides it (the scheduler decides only the
        order of what waits, the engine only how a batch is cut into length-sorted chunks). Rows:
        `max_batch_rows`, and with several engine workers an even share of what waits now (at least
        `chunk_rows`), so a burst is computed by all of them side by side instead of by the first one free.
        Tokens: `batch_token_limit`."""
        s = self.settings
        rows = s.max_batch_rows
        if workers > 1:
            share = -(-queues.total_rows // workers)
            rows = min(rows, max(share, s.chunk_rows or 1))
        return BatchLimits(rows, self.batch_token_limit(queues, workers, contended))

    def batch_token_limit(self, queues: TenantQueues, workers: int = 1, contended: bool = False) -> int:
        """max_batch_tokens; while several tenants are active (`contended`) also `fair_batch_ms`, and under
        overload `max_batch_ms`, of compute at one worker's share of the engine's peak drain rate (the
        rate is all `workers` together; a batch runs on one of them). The peak, not the current rate:
        small batches are slower per token, and a cap from their rate would shrink the next batches in
        turn until each held one row. A batch that cannot be cut short bounds how long another tenant's
        request waits for a worker, so its length in time is the scheduler's grain."""
        s = self.settings
        limit = s.max_batch_tokens
        if not self.drain.tokens_per_s:
            return limit
        rate = self.worker_rate(workers)
        if contended and s.fair_batch_ms > 0:
            limit = min(limit, int(rate * s.fair_batch_ms / 1000))
        if s.max_batch_ms > 0 and self.overloaded(queues):
            limit = min(limit, int(rate * s.max_batch_ms / 1000))
        return max(1, limit)
