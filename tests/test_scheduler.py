"""VTC across tenants (scheduler.py) against its definition: lowest counter first, charged on dispatch,
lifted when it becomes backlogged, work-conserving; FCFS in arrival order."""

from __future__ import annotations

from dataclasses import dataclass

from switchboard.server.runtime.scheduler import TenantQueues


@dataclass
class Item:
    tenant: str
    tokens: int = 100
    rows: int = 1
    cost: int = 100
    seq: int = 0


def drain(queues: TenantQueues, n: int) -> list[str]:
    out = []
    for _ in range(n):
        item = queues.peek()
        if item is None:
            break
        queues.pop(item)
        out.append(item.tenant)
    return out


def test_a_flooding_tenant_does_not_delay_a_light_one():
    q = TenantQueues("vtc")
    for _ in range(50):
        q.push(Item("A"))
    assert drain(q, 10) == ["A"] * 10  # work-conserving: alone, A gets everything
    q.push(Item("B"))
    q.push(Item("B"))
    # B joins lifted to A's counter (no credit for its idle past); ties go to the earlier arrival: they alternate
    assert drain(q, 4) == ["A", "B", "A", "B"]
    assert q.counters["A"] == q.counters["B"] == 1200  # B lifted to 1000, then served 200


def test_costs_not_requests_are_what_is_shared():
    q = TenantQueues("vtc")
    for _ in range(6):
        q.push(Item("long", tokens=500, cost=500))
        q.push(Item("short", tokens=100, cost=100))
    order = drain(q, 8)
    assert order.count("short") >= 5  # five 100-token requests cost what one 500-token one does


def test_a_cold_load_is_charged_and_a_dropped_request_is_not():
    q = TenantQueues("vtc")
    cold, dropped = Item("A", cost=100 + 256), Item("B")
    q.push(cold)
    q.push(dropped)
    assert q.peek() is dropped  # equal counters: the cheaper one finishes first
    q.pop(q.peek(), charge=False)  # B's request was dropped (client gone): no service, no charge
    q.pop(q.peek())
    assert q.counters == {"A": 356.0, "B": 0.0} and not q


def test_returning_tenant_is_lifted_to_the_minimum_backlogged_counter():
    q = TenantQueues("vtc")
    q.push(Item("A"))
    drain(q, 1)
    for _ in range(30):
        q.push(Item("C"))
    drain(q, 20)  # C alone: counter 2000
    q.push(Item("A"))  # A was idle: lifted from 100 to C's 2000, not ahead by 1900 tokens
    assert q.counters["A"] == q.counters["C"] == 2000
    assert drain(q, 4) == ["C", "A", "C", "C"]


def test_fcfs_is_arrival_order_and_rows_tokens_are_accounted():
    q = TenantQueues("fcfs")
    for tenant in ["A", "A", "A", "B", "A"]:
        q.push(Item(tenant, rows=2, tokens=50))
    assert q.total_rows == 10 and q.total_tokens == 250 and q.rows["A"] == 8
    assert drain(q, 5) == ["A", "A", "A", "B", "A"]
    assert q.total_rows == 0 and not q.backlogged


def test_what_runs_before_a_light_tenant_is_not_a_flooders_whole_backlog():
    q = TenantQueues("vtc")
    for _ in range(50):
        q.push(Item("A"))
    q.pop(q.peek())  # A served 100: counter 100
    assert q.ahead_of("B") == 0  # B would be lifted to A's counter and go next
    q.push(Item("B"))
    assert q.ahead_of("B") == 100 + 100  # its own queued request and an equal share of A; the rest of A is behind
    assert q.ahead_of("A") == 49 * 100 + 100  # A waits for its own backlog and B's share
    fcfs = TenantQueues("fcfs")
    for tenant in "AAB":
        fcfs.push(Item(tenant))
    assert fcfs.ahead_of("B") == 300


def test_at_equal_counters_a_light_tenants_short_request_goes_before_a_long_one():
    q = TenantQueues("vtc")
    for _ in range(5):
        q.push(Item("A", tokens=512, cost=512))
    q.pop(q.peek())
    q.push(Item("B", tokens=16, cost=16))  # lifted to A's counter; A's head arrived earlier but costs more
    assert drain(q, 2) == ["B", "A"]


def test_a_tenant_idle_or_throttled_while_another_was_served_comes_back_without_credit():
    """With nobody backlogged, a returning tenant rejoins at the counter service has reached (VTC's lift
    needs a reference when the queue ran dry): else a flooder throttled for a second while B was served
    returns far below B's counter, and its burst runs ahead of B's next requests."""
    q = TenantQueues("vtc")
    for _ in range(10):
        q.push(Item("A"))
    drain(q, 10)
    for _ in range(50):  # A throttled: B alone, one request at a time
        q.push(Item("B"))
        drain(q, 1)
    for _ in range(20):
        q.push(Item("A"))  # A's burst after its throttle window
    q.push(Item("B"))
    assert "B" in drain(q, 3)  # A rejoins one request behind B, not 49
    assert q.ahead_of("B") <= 200
