"""Which waiting request runs next: one FIFO per tenant, tenants chosen by Virtual Token Counter.

VTC (Sheng et al., "Fairness in Serving Large Language Models", OSDI '24): every tenant has a counter
of the tokens it has been served. The next request (a chunk of one, batcher.py) comes from the
backlogged tenant with the lowest counter after it would be served (counter + cost: at equal
counters the shorter one first), and is charged its padded tokens (rows × length) plus a charge for
a cold adapter load when it is dispatched. A tenant that becomes backlogged is lifted to the lowest
counter among the backlogged (with none backlogged, to the counter service has reached), so idling
— or being throttled while another tenant is served — earns no credit. Work-conserving: with one tenant
backlogged, it gets everything. `fcfs` (arrival order) is kept for comparison (bench/fairness.py).

A plain data structure: the batcher holds its lock around every call.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from typing import Literal, Protocol

Policy = Literal["vtc", "fcfs"]


class Queued(Protocol):
    tenant: str
    rows: int
    tokens: int
    cost: int
    seq: int


@dataclass
class TenantQueues:
    policy: Policy = "vtc"
    _queues: dict[str, collections.deque] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)  # VTC: tokens served, per tenant
    rows: collections.Counter[str] = field(default_factory=collections.Counter)
    tokens: collections.Counter[str] = field(default_factory=collections.Counter)
    _seq: itertools.count = field(default_factory=itertools.count)
    vtime: float = 0.0  # the highest counter a dispatched chunk started from: where an idle tenant rejoins

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    @property
    def backlogged(self) -> list[str]:
        return [t for t, q in self._queues.items() if q]

    def __bool__(self) -> bool:
        return any(self._queues.values())

    def push(self, item: Queued) -> None:
        queue = self._queues.setdefault(item.tenant, collections.deque())
        if not queue:  # becoming backlogged: no credit for the time it was idle
            self.counters[item.tenant] = self._rejoin(item.tenant)
        item.seq = next(self._seq)
        queue.append(item)
        self.rows[item.tenant] += item.rows
        self.tokens[item.tenant] += item.tokens

    def _rejoin(self, tenant: str) -> float:
        """The counter a tenant becoming backlogged starts from: its own, lifted to the lowest backlogged
        counter — or, with nobody backlogged, to where service has reached (`vtime`): a tenant that was
        throttled or idle while another was served must not come back with credit to spend ahead of it."""
        others = [self.counters.get(t, 0.0) for t in self.backlogged if t != tenant]
        return max(self.counters.get(tenant, 0.0), min(others) if others else self.vtime)

    def ahead_of(self, tenant: str) -> int:
        """Tokens that would run before a new request of `tenant` starts: everything under FCFS; under
        VTC its own queue, and from each other backlogged tenant only what that tenant is served until
        its counter reaches the one `tenant` will have then (a flooding neighbour's backlog beyond
        that runs after, so it must not count against this tenant's wait)."""
        if self.policy == "fcfs":
            return self.total_tokens
        own = self.tokens[tenant]
        counter = self.counters.get(tenant, 0.0) if own else self._rejoin(tenant)  # as push would lift it
        reach = counter + own
        return own + sum(min(self.tokens[t], max(0, int(reach - self.counters.get(t, 0.0))))
                         for t in self.backlogged if t != tenant)

    def peek(self) -> Queued | None:
        """The request that runs next under the policy."""
        heads = [q[0] for q in self._queues.values() if q]
        if not heads:
            return None
        if self.policy == "fcfs":
            return min(heads, key=lambda item: item.seq)
        # by virtual finish (counter + cost): between tenants at the same counter — a light tenant just
        # lifted to a flooder's — the shorter chunk goes first, so one text never waits for a 512-token row
        return min(heads, key=lambda item: (self.counters[item.tenant] + item.cost, item.seq))

    def pop(self, item: Queued, charge: bool = True) -> None:
        """Remove the head `item` of its tenant's queue; charge its cost unless it was dropped."""
        queue = self._queues[item.tenant]
        assert queue[0] is item
        queue.popleft()
        self.rows[item.tenant] -= item.rows
        self.tokens[item.tenant] -= item.tokens
        if charge:
            self.vtime = max(self.vtime, self.counters.get(item.tenant, 0.0))
            self.counters[item.tenant] = self.counters.get(item.tenant, 0.0) + item.cost
        if not queue:
            del self._queues[item.tenant]
