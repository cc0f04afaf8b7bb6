"""The batcher in-process with a fake engine: every row gets its own slot's answer, batches mix tasks,
overload / deadline / client-gone paths never compute and always release the lease exactly once, a
failing forward fails only its own batch (logged), and stop() finishes what was admitted."""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import pytest
import torch

from switchboard.server.errors import DeadlineExceeded, Overloaded
from switchboard.server.metrics import Metrics
from switchboard.server.runtime.batcher import Batcher
from switchboard.server.runtime.lease import Lease
from switchboard.server.settings import Settings
from tests.fakes import FakeEngine, expected_logits


class Pin:
    """Stands in for the registry's version: a slot and a pin count."""

    def __init__(self, slot: int) -> None:
        self.record = None
        self.slot = slot
        self.count = 0

    def lease(self) -> Lease:
        self.count += 1
        return Lease(self, lambda pin: setattr(pin, "count", pin.count - 1))


T = {"tenant": "default", "max_queued_rows": 10_000}  # one tenant, no tenant quota in these tests


def rows(seed: int, n: int = 1, length: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 1000, size=(n, length)).astype(np.int64)
    return ids, np.ones_like(ids)


@pytest.fixture
def make(tiny, tmp_path):
    made: list[Batcher] = []

    def build(**settings) -> tuple[Batcher, FakeEngine, Metrics]:
        engine = FakeEngine(tiny.spec)
        for slot in range(1, 9):
            engine.books.book(0, slot=slot)
        metrics = Metrics()
        batcher = Batcher(engine, Settings(data_dir=tmp_path, **settings), metrics)
        batcher.start()
        made.append(batcher)
        return batcher, engine, metrics

    yield build
    for batcher in made:
        batcher.stop(5)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


def test_concurrent_requests_share_mixed_batches_and_each_row_gets_its_own_answer(make):
    batcher, engine, _ = make(batch_wait_ms=30)
    pins = {slot: Pin(slot) for slot in range(1, 9)}
    requests = [(1 + i % 8, *rows(i, n=1 + i % 3)) for i in range(40)]

    async def fire():
        items = [batcher.submit(pins[slot].lease(), ids, mask, 30, **T) for slot, ids, mask in requests]
        return await asyncio.gather(*[batcher.result(item) for item in items])

    answers = asyncio.run(fire())
    for (slot, ids, _), logits in zip(requests, answers):
        assert torch.equal(logits, expected_logits(slot, torch.from_numpy(ids), engine.width))
    assert len(engine.batches) < len(requests), "requests should share forward passes"
    assert max(len(set(b)) for b in engine.batches) > 1, "batches should mix tasks"
    assert all(pin.count == 0 for pin in pins.values())


def test_a_full_queue_answers_overloaded_and_releases_the_lease(make):
    batcher, engine, metrics = make(max_queue_rows=4, batch_wait_ms=0)
    engine.gate = threading.Event()
    pin = Pin(1)

    async def fire():
        first = batcher.submit(pin.lease(), *rows(0), 30, **T)
        await asyncio.sleep(0.2)  # the worker took it and waits at the gate
        queued = [batcher.submit(pin.lease(), *rows(i, n=2), 30, **T) for i in (1, 2)]  # 4 rows: full
        with pytest.raises(Overloaded) as refused:
            batcher.submit(pin.lease(), *rows(3), 30, **T)
        assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "1"
        assert pin.count == 3  # the refused request's lease is already released
        engine.gate.set()
        return await asyncio.gather(*[batcher.result(i) for i in [first, *queued]])

    assert len(asyncio.run(fire())) == 3
    assert pin.count == 0
    assert sample(metrics, "switchboard_dropped_requests_total", reason="queue_full") == 1


def test_a_request_past_its_deadline_is_never_computed(make):
    batcher, engine, metrics = make(batch_wait_ms=0)
    engine.gate = threading.Event()
    busy, late = Pin(1), Pin(2)

    async def fire():
        first = batcher.submit(busy.lease(), *rows(0), 30, **T)
        await asyncio.sleep(0.1)
        item = batcher.submit(late.lease(), *rows(1), timeout_s=0.05, **T)
        await asyncio.sleep(0.2)  # its deadline passes while the worker is busy
        engine.gate.set()
        with pytest.raises(DeadlineExceeded):
            await batcher.result(item)
        await batcher.result(first)

    asyncio.run(fire())
    assert all(2 not in batch for batch in engine.batches)
    assert busy.count == late.count == 0
    assert sample(metrics, "switchboard_dropped_requests_total", reason="deadline") == 1


def test_a_request_whose_client_left_is_never_computed(make):
    batcher, engine, metrics = make(batch_wait_ms=0)
    engine.gate = threading.Event()
    busy, gone = Pin(1), Pin(2)

    async def fire():
        first = batcher.submit(busy.lease(), *rows(0), 30, **T)
        await asyncio.sleep(0.1)
        item = batcher.submit(gone.lease(), *rows(1), 30, **T)
        waiting = asyncio.ensure_future(batcher.result(item))
        await asyncio.sleep(0.05)
        waiting.cancel()  # the HTTP handler is cancelled when its client disconnects
        await asyncio.sleep(0.05)  # the cancellation runs on the loop's next turn
        engine.gate.set()
        await batcher.result(first)
        await asyncio.sleep(0.2)

    asyncio.run(fire())
    assert all(2 not in batch for batch in engine.batches)
    assert busy.count == gone.count == 0
    assert sample(metrics, "switchboard_dropped_requests_total", reason="client_gone") == 1


def test_a_failing_forward_fails_its_batch_only_and_is_logged(make, caplog):
    batcher, engine, _ = make(batch_wait_ms=50)
    engine.fail_with = RuntimeError("boom")
    pin = Pin(3)

    async def fire():
        items = [batcher.submit(pin.lease(), *rows(i), 30, **T) for i in range(3)]
        results = await asyncio.gather(*[batcher.result(i) for i in items], return_exceptions=True)
        again = await batcher.result(batcher.submit(pin.lease(), *rows(9), 30, **T))
        return results, again

    with caplog.at_level(logging.ERROR, logger="switchboard.server.runtime.batcher"):
        results, again = asyncio.run(fire())
    assert all(isinstance(r, RuntimeError) and str(r) == "boom" for r in results)
    assert torch.equal(again, expected_logits(3, torch.from_numpy(rows(9)[0]), engine.width))
    assert pin.count == 0
    failure = next(r for r in caplog.records if "forward pass failed" in r.getMessage())
    assert failure.exc_info is not None  # the traceback is in the log


def test_stop_finishes_every_admitted_request(make):
    batcher, engine, _ = make(batch_wait_ms=100)
    pin = Pin(4)

    async def fire():
        items = [batcher.submit(pin.lease(), *rows(i), 30, **T) for i in range(6)]
        stopper = threading.Thread(target=batcher.stop)
        stopper.start()
        results = await asyncio.gather(*[batcher.result(i) for i in items])
        stopper.join()
        with pytest.raises(Overloaded):
            batcher.submit(pin.lease(), *rows(7), 30, **T)
        return results

    assert len(asyncio.run(fire())) == 6
    assert pin.count == 0 and not batcher.running


def test_the_queue_is_bounded_in_tokens_and_retry_after_follows_the_drain_rate(make):
    """Long inputs fill the queue by tokens long before they fill it by rows: the 64 × 512-token probe."""
    batcher, engine, metrics = make(max_queue_tokens=4096, max_queue_delay_s=1000, batch_wait_ms=0,
                                    overload_factor=1e9)  # this test isolates the token bound
    engine.gate = threading.Event()
    batcher.drain.assume(1000.0)  # as if measured: 1,000 tokens per second
    pin = Pin(5)

    async def fire():
        first = batcher.submit(pin.lease(), *rows(0, length=512), 30, **T)
        await asyncio.sleep(0.1)  # in flight at the gate
        admitted, refusals = [first], []
        for i in range(1, 64):
            try:
                admitted.append(batcher.submit(pin.lease(), *rows(i, length=512), 30, **T))
            except Overloaded as exc:
                refusals.append(exc)
        engine.gate.set()
        await asyncio.gather(*[batcher.result(item) for item in admitted])
        return admitted, refusals

    admitted, refusals = asyncio.run(fire())
    assert len(admitted) == 1 + 4096 // 512 and len(refusals) == 64 - len(admitted)
    assert all(r.status == 429 and "tokens waiting" in r.message for r in refusals)
    # one 512-token request over a full queue drains in 512 / 1000 s: Retry-After rounds up to 1 s
    assert {r.headers["Retry-After"] for r in refusals} == {"1"}
    assert pin.count == 0
    assert sample(metrics, "switchboard_dropped_requests_total", reason="queue_full") == len(refusals)


def test_work_that_would_wait_too_long_is_refused_at_admission_not_after_waiting(make):
    batcher, engine, metrics = make(max_queue_delay_s=2.0, batch_wait_ms=0, overload_factor=1e9)  # the burst cap alone
    engine.gate = threading.Event()
    batcher.drain.assume(1000.0)
    pin = Pin(6)

    async def fire():
        first = batcher.submit(pin.lease(), *rows(0, length=500), 30, **T)
        await asyncio.sleep(0.1)
        queued = [batcher.submit(pin.lease(), *rows(i, length=500), 30, **T) for i in (1, 2, 3, 4)]  # 2.5 s ahead
        with pytest.raises(Overloaded) as late:
            batcher.submit(pin.lease(), *rows(5, length=10), 30, **T)  # even a short one would wait 2.5 s
        engine.gate.set()
        await asyncio.gather(*[batcher.result(item) for item in [first, *queued]])
        return late.value

    late = asyncio.run(fire())
    assert late.status == 429 and "would take 2.5 s" in late.message and late.headers["Retry-After"] == "1"
    assert sample(metrics, "switchboard_dropped_requests_total", reason="queue_delay") == 1
    assert pin.count == 0


def test_the_drain_rate_is_measured_from_real_batches(make):
    batcher, engine, metrics = make(batch_wait_ms=0)
    pin = Pin(7)

    async def fire():
        for i in range(3):
            await batcher.result(batcher.submit(pin.lease(), *rows(i, n=4, length=32), 30, **T))

    asyncio.run(fire())
    assert batcher.drain.tokens_per_s and batcher.drain.tokens_per_s > 0
    assert sample(metrics, "switchboard_drain_tokens_per_second") == pytest.approx(batcher.drain.tokens_per_s)


def test_a_standing_queue_switches_admission_to_the_short_target(make):
    """A burst may queue up to max_queue_delay_s. Admitted demand above 2 × what the worker drains is
    overload: then only work that waits at most the target is admitted, until demand is back at
    capacity. A standing queue that is not fed faster than it drains (a closed loop) is not shed."""
    batcher, engine, metrics = make(queue_target_ms=100, queue_interval_ms=200, max_queue_delay_s=5, batch_wait_ms=0)
    batcher.drain.assume(1000.0)
    pin = Pin(2)

    async def fire():
        for i in range(3):  # the server has been serving: some work completed
            await batcher.result(batcher.submit(pin.lease(), *rows(40 + i, length=100), 30, **T))
        batcher.drain.assume(1000.0)
        engine.gate = threading.Event()
        first = batcher.submit(pin.lease(), *rows(0, length=100), 30, **T)
        await asyncio.sleep(0.05)  # the worker took it and is held at the gate
        admitted = [batcher.submit(pin.lease(), *rows(1, length=100), 30, **T)]
        await asyncio.sleep(0.3)  # a standing queue, but fed with only 100 tokens: less than it drains
        assert not batcher.overloaded
        shed = None
        for i in range(40):  # a surge of 5,000 tokens/s: first admitted (under the 5 s cap), then shed
            try:
                admitted.append(batcher.submit(pin.lease(), *rows(2 + i, length=100), 30, **T))
            except Overloaded as exc:
                shed = exc
                break
            await asyncio.sleep(0.02)
        assert shed is not None and batcher.overloaded and len(admitted) >= 3
        engine.gate.set()
        await asyncio.gather(*[batcher.result(item) for item in [first, *admitted]])
        await asyncio.sleep(0.6)  # demand fell back and nothing was shed for an interval
        assert not batcher.overloaded
        await batcher.result(batcher.submit(pin.lease(), *rows(30, length=10), 30, **T))
        return shed

    shed = asyncio.run(fire())
    assert shed.status == 429 and shed.message.startswith("overloaded") and "limit 0.1 s" in shed.message
    assert pin.count == 0


def test_a_tenant_past_its_queued_rows_quota_gets_429_while_others_are_admitted(make):
    batcher, engine, metrics = make(batch_wait_ms=0, overload_factor=1e9)
    engine.gate = threading.Event()
    pin = Pin(1)

    async def fire():
        busy = batcher.submit(pin.lease(), *rows(0), 30, tenant="A", max_queued_rows=3)
        await asyncio.sleep(0.1)
        queued = [batcher.submit(pin.lease(), *rows(i), 30, tenant="A", max_queued_rows=3) for i in (1, 2, 3)]
        with pytest.raises(Overloaded) as refused:
            batcher.submit(pin.lease(), *rows(4), 30, tenant="A", max_queued_rows=3)
        other = batcher.submit(pin.lease(), *rows(5), 30, tenant="B", max_queued_rows=3)  # B's quota is its own
        engine.gate.set()
        await asyncio.gather(*[batcher.result(i) for i in [busy, *queued, other]])
        return refused.value

    refused = asyncio.run(fire())
    assert refused.status == 429 and "max_queued_rows 3" in refused.message and refused.headers["Retry-After"]
    assert sample(metrics, "switchboard_dropped_requests_total", reason="tenant_queue_full") == 1
    assert sample(metrics, "switchboard_tenant_throttled_total", tenant="A") == 1
    assert sample(metrics, "switchboard_tenant_rows_total", tenant="B") == 1
    assert pin.count == 0
    # for a moment after a refusal for its own demand, A is throttled before its next body is read; B never was
    assert batcher.throttled("A") == int(refused.headers["Retry-After"]) and batcher.throttled("B") is None
    assert sample(metrics, "switchboard_dropped_requests_total", reason="throttled") == 1


def test_without_a_throttle_window_a_refused_tenant_is_judged_request_by_request(make):
    batcher, engine, _ = make(batch_wait_ms=0, overload_factor=1e9, throttle_window_ms=0)
    engine.gate = threading.Event()
    pin = Pin(1)

    async def fire():
        busy = batcher.submit(pin.lease(), *rows(0), 30, tenant="A", max_queued_rows=1)
        await asyncio.sleep(0.1)
        queued = batcher.submit(pin.lease(), *rows(1), 30, tenant="A", max_queued_rows=1)
        with pytest.raises(Overloaded):
            batcher.submit(pin.lease(), *rows(2), 30, tenant="A", max_queued_rows=1)
        engine.gate.set()
        await asyncio.gather(batcher.result(busy), batcher.result(queued))

    asyncio.run(fire())
    assert batcher.throttled("A") is None and pin.count == 0


def test_batches_follow_vtc_across_tenants(make):
    batcher, engine, _ = make(batch_wait_ms=0, max_batch_rows=2, overload_factor=1e9, fair_batch_ms=0)
    engine.gate = threading.Event()
    a, b = Pin(1), Pin(2)

    async def fire():
        first = batcher.submit(a.lease(), *rows(0), 30, **T)
        await asyncio.sleep(0.1)  # held at the gate
        flood = [batcher.submit(a.lease(), *rows(i), 30, tenant="A", max_queued_rows=100) for i in range(1, 9)]
        light = [batcher.submit(b.lease(), *rows(i), 30, tenant="B", max_queued_rows=100) for i in (20, 21)]
        engine.gate.set()
        await asyncio.gather(*[batcher.result(i) for i in [first, *flood, *light]])

    asyncio.run(fire())
    # after the first batch, B's two requests (arrived last) ride in the very next batches, not after A's eight
    second, third = engine.batches[1], engine.batches[2]
    assert 2 in second and 2 in third, engine.batches


def test_under_overload_a_batch_is_capped_at_max_batch_ms_of_one_workers_compute(tmp_path):
    """The drain rate is what all engine workers complete together; a batch runs on one of them, so with
    N workers its cap is max_batch_ms at a 1/N share of that rate (else each batch takes N × as long),
    and at the peak rate (else small batches lower the rate, the cap, and the next batches in turn)."""
    from switchboard.server.runtime.admission import Admission
    from switchboard.server.runtime.scheduler import TenantQueues

    admission = Admission(Settings(data_dir=tmp_path, max_batch_ms=100, max_batch_tokens=8192))
    admission.drain.assume(1000.0)  # 1,000 tokens per second, all workers together
    queues = TenantQueues("vtc")
    assert admission.batch_token_limit(queues, workers=2) == 8192  # not overloaded: the plain bound
    admission.overloaded = lambda _queues: True
    assert admission.batch_token_limit(queues, workers=1) == 100
    assert admission.batch_token_limit(queues, workers=2) == 50
    # tiny batches are slower per token: the current rate falls, the cap keeps to the engine's peak
    admission.drain.observe(100, 1.0)
    assert admission.drain.tokens_per_s < 900
    assert admission.batch_token_limit(queues, workers=1) == pytest.approx(100, abs=1)


def test_a_huge_request_is_cut_into_chunks_and_another_tenant_rides_between_them(make):
    """Issue 20: one 64 × 512-token request held an engine worker for its whole forward; B waited ~12 s.
    Cut into chunks of max_chunk_tokens, it is many scheduling steps: B's one row runs in the next batch,
    and A's answer is still every row's own, in order."""
    batcher, engine, metrics = make(batch_wait_ms=0, max_chunk_tokens=1024, overload_factor=1e9)
    engine.gate = threading.Event()
    busy, a, b = Pin(1), Pin(2), Pin(3)
    huge_ids, huge_mask = rows(7, n=64, length=512)
    huge_mask[1::2, 300:] = 0  # odd rows are shorter: a chunk is trimmed to its own longest row
    huge_ids[huge_mask == 0] = 0

    async def fire():
        first = batcher.submit(busy.lease(), *rows(0), 30, **T)
        await asyncio.sleep(0.1)  # the worker is held at the gate
        huge = batcher.submit(a.lease(), huge_ids, huge_mask, 30, tenant="A", max_queued_rows=10_000)
        light = batcher.submit(b.lease(), *rows(1), 30, tenant="B", max_queued_rows=10_000)
        assert batcher.queued_rows("A") == 64
        engine.gate.set()
        return await asyncio.gather(batcher.result(first), batcher.result(huge), batcher.result(light))

    _, huge, light = asyncio.run(fire())
    assert torch.equal(huge, expected_logits(2, torch.from_numpy(huge_ids), engine.width))
    assert torch.equal(light, expected_logits(3, torch.from_numpy(rows(1)[0]), engine.width))
    slots = engine.batches
    b_batch = next(i for i, batch in enumerate(slots) if 3 in batch)
    a_batches = [i for i, batch in enumerate(slots) if 2 in batch]
    assert len(a_batches) >= 64 * 512 // 8192, "A's request should take many batches"
    assert b_batch <= 2 and b_batch < a_batches[-1], slots  # B did not wait for the whole of A's request
    assert busy.count == a.count == b.count == 0


def test_a_failing_chunk_fails_its_whole_request_once_and_releases_it_once(make):
    batcher, engine, _ = make(batch_wait_ms=0, max_chunk_tokens=64, max_batch_tokens=64)
    engine.fail_with = RuntimeError("boom")
    pin = Pin(4)

    async def fire():
        item = batcher.submit(pin.lease(), *rows(3, n=8, length=32), 30, **T)  # 4 chunks of 2 rows
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.result(item)
        return await batcher.result(batcher.submit(pin.lease(), *rows(5, n=8, length=32), 30, **T))

    again = asyncio.run(fire())
    assert torch.equal(again, expected_logits(4, torch.from_numpy(rows(5, n=8, length=32)[0]), engine.width))
    assert pin.count == 0


def test_a_neighbours_backlog_does_not_count_against_a_light_tenants_wait(make):
    """Admission estimates the wait from what would run before *this* tenant's request: under VTC not
    A's whole backlog, so B is admitted (and served at once) while A's own next request is refused."""
    batcher, engine, metrics = make(max_queue_delay_s=2.0, batch_wait_ms=0, overload_factor=1e9)
    engine.gate = threading.Event()
    batcher.drain.assume(1000.0)
    a, b = Pin(1), Pin(2)

    async def fire():
        first = batcher.submit(a.lease(), *rows(0, length=100), 30, tenant="A", max_queued_rows=10_000)
        await asyncio.sleep(0.1)
        backlog = batcher.submit(a.lease(), *rows(1, n=25, length=100), 30, tenant="A", max_queued_rows=10_000)
        with pytest.raises(Overloaded):  # 2.5 s of A's own work ahead of A's next request
            batcher.submit(a.lease(), *rows(2, length=100), 30, tenant="A", max_queued_rows=10_000)
        light = batcher.submit(b.lease(), *rows(3, length=10), 30, tenant="B", max_queued_rows=10_000)
        engine.gate.set()
        await asyncio.gather(*[batcher.result(i) for i in (first, backlog, light)])

    asyncio.run(fire())
    assert a.count == b.count == 0
    assert sample(metrics, "switchboard_dropped_requests_total", reason="queue_delay") == 1


def test_while_several_tenants_are_active_a_batch_is_capped_at_fair_batch_ms(tmp_path):
    from switchboard.server.runtime.admission import Admission
    from switchboard.server.runtime.scheduler import TenantQueues

    admission = Admission(Settings(data_dir=tmp_path, fair_batch_ms=50, max_batch_ms=0, max_batch_tokens=8192))
    admission.drain.assume(10_000.0)
    queues = TenantQueues("vtc")
    assert admission.batch_token_limit(queues, workers=2, contended=False) == 8192  # one tenant: plain bound
    assert admission.batch_token_limit(queues, workers=2, contended=True) == 250  # 50 ms of one worker's share


def test_workers_stagger_long_batches_so_one_is_soon_free_and_short_chunks_need_no_wait(tiny, tmp_path):
    """With two workers and another tenant active, a worker holds off a long chunk until half its length
    after the other worker's batch started (then one of them frees up every half batch, not every whole
    one); a one-text chunk is taken at once."""
    import time as clock

    from switchboard.server.runtime.batcher import Chunk, WorkItem

    engine = FakeEngine(tiny.spec)
    engine.parallelism = 2
    batcher = Batcher(engine, Settings(data_dir=tmp_path), Metrics())  # not started: _stagger is pure here
    batcher.drain.assume(2000.0)  # 1,000 tokens/s per worker
    item = WorkItem("A", np.zeros(1, dtype=np.int64), [], *rows(0, length=500), None, None, 0.0, 1e9)
    batcher._queues.push(Chunk(item, 0, 0, 1, 500, 500))
    now = clock.monotonic()
    assert batcher._stagger(0, now) == 0.0  # nothing else in flight
    batcher._started[1] = now - 0.05
    assert batcher._stagger(0, now) == pytest.approx(0.25 - 0.05)  # 0.5 s chunk ÷ 2 workers, 0.05 s already gone
    batcher._queues.pop(batcher._queues.peek())
    short = WorkItem("B", np.zeros(1, dtype=np.int64), [], *rows(1, length=4), None, None, 0.0, 1e9)
    batcher._queues.push(Chunk(short, 0, 0, 1, 4, 4))
    assert batcher._stagger(0, now) == 0.0  # 4 ms ÷ 2 is already past


def test_precheck_refuses_a_request_that_cannot_fit_before_it_is_tokenized(make):
    """A flooder's 64 long texts, which its own queue leaves no room for, is refused from a lower bound of
    its size (the classify route passes words + 2 per text), before a tokenizer call; another tenant's
    request of the same size, and the flooder's small one, pass."""
    batcher, engine, metrics = make(batch_wait_ms=0, overload_factor=1e9, max_queue_rows=2048, max_queue_tokens=65536)
    engine.gate = threading.Event()
    pin = Pin(1)

    async def fire():
        busy = batcher.submit(pin.lease(), *rows(0, length=512), 30, tenant="A", max_queued_rows=512)
        await asyncio.sleep(0.1)
        backlog = batcher.submit(pin.lease(), *rows(1, n=16, length=512), 30, tenant="A", max_queued_rows=512)
        with pytest.raises(Overloaded) as refused:  # 8,192 tokens queued + at least 25,600: past A's 16,384
            batcher.precheck("A", 512, rows=64, min_tokens=64 * 400)
        batcher.precheck("A", 512)  # nothing known of the size: not refused here (submit judges it)
        batcher.precheck("B", 512, rows=64, min_tokens=64 * 400)  # B's queue is empty
        engine.gate.set()
        await asyncio.gather(batcher.result(busy), batcher.result(backlog))
        return refused.value

    refused = asyncio.run(fire())
    assert refused.status == 429 and "max_queued_rows 512" in refused.message
    assert pin.count == 0
