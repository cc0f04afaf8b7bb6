"""The scheduler's half of a classify or embed request: resolve → schedule → forward.

A front (an HTTP process) decodes, authenticates, tokenizes and encodes; it hands the scheduler a
`Job` — who asks, which tasks, the token arrays — and gets an `Answer` back: the logits and, per task,
the version that answered and its labels. `LocalServing` runs a job in this process (front 0 lives in
the scheduler's process); `front_link.RemoteServing` sends it over ZeroMQ from another front process
to the same `LocalServing.run` here. One code path, so leases, admission, VTC, deadlines and
cancellation behave the same whichever front a request came through.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from switchboard.server.core.engine import CapacityError
from switchboard.server.errors import InsufficientCapacity, NotARerankTask

if TYPE_CHECKING:
    from switchboard.server.core.backbone import BackboneSpec
    from switchboard.server.runtime.builder import Runtime
    from switchboard.server.runtime.tenancy import Principal


class Job(msgspec.Struct, frozen=True):
    """One request's rows for the scheduler. `tasks` empty: embeddings. `authorization`/`tenant_header`
    travel so the scheduler checks the key again (a key revoked a moment ago stops at once)."""

    tenant: str
    tasks: list[str]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    timeout_s: float
    authorization: str | None = None
    tenant_header: str | None = None
    max_labels: int | None = None  # refuse a task with more labels before any work (rerank: 2)

    @property
    def embed(self) -> bool:
        return not self.tasks


class TaskAnswer(msgspec.Struct, frozen=True):
    version: int
    labels: list[str]
    temperature: float = 1.0  # probabilities are softmax(logits / temperature); raw scores are the logits


class Answer(msgspec.Struct, frozen=True):
    """Logits [rows, C] (rows = inputs × tasks, task-major); per task its version and labels."""

    logits: np.ndarray
    tasks: list[TaskAnswer]


class LocalServing:
    """Jobs run against this process's runtime; also what the gate asks about keys and throttles."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.spec: BackboneSpec = runtime.engine.spec
        self.embedding_dim = runtime.embedding.dim

    @property
    def open_mode(self) -> bool:
        return self.runtime.tenancy.open_mode

    async def authenticate(self, authorization: str | None, tenant_header: str | None) -> Principal:
        return self.runtime.tenancy.authenticate(authorization, tenant_header)

    def throttled(self, tenant: str) -> int | None:
        return self.runtime.batcher.throttled(tenant)

    def precheck(self, tenant: str, rows: int, min_tokens: int) -> None:
        """429 before tokenizing if even the request's least possible size would be refused."""
        runtime = self.runtime
        runtime.batcher.precheck(tenant, runtime.tenancy.quotas(tenant).max_queued_rows, rows, min_tokens)

    def throttle_window(self, tenant: str) -> float:
        """Seconds this tenant's classify requests are refused from their headers (0: not throttled)."""
        return self.runtime.batcher.throttle_window(tenant)

    async def run(self, job: Job) -> Answer:
        """Resolve the task versions (loading evicted ones), queue the rows, wait for the forward pass.
        Cancelling this (the client left) drops the rows unless their forward pass already started."""
        runtime, tenant = self.runtime, job.tenant
        queued_rows = runtime.tenancy.quotas(tenant).max_queued_rows
        ids, mask = job.input_ids, job.attention_mask
        with ExitStack() as held:  # every lease is released here unless handed to the batcher
            if job.embed:
                leases, answers = [runtime.embedding.lease()], [TaskAnswer(0, [])]
                cold = False
            else:
                leases = [held.enter_context(runtime.registry.acquire((tenant, name))) for name in job.tasks]
                if job.max_labels is not None:
                    for name, lease in zip(job.tasks, leases, strict=True):
                        if len(lease.record.labels) > job.max_labels:
                            raise NotARerankTask(
                                f"task {name!r} has {len(lease.record.labels)} labels; /v1/rerank needs a task with "
                                "one label (a relevance score) or two (the second meaning relevant), trained on pairs")
                cold = False
                for name, lease in zip(job.tasks, leases, strict=True):
                    if lease.slot is None:  # evicted or restored from the store: load it off the loop
                        cold = True
                        try:
                            await runtime.request_pool.run(runtime.registry.ensure_resident, lease)
                        except CapacityError as exc:
                            raise InsufficientCapacity(f"no device slot free for task {name!r}: {exc}") from exc
                answers = [TaskAnswer(lease.record.version, list(lease.record.labels), lease.temperature)
                           for lease in leases]  # after the loads: the temperature is the resident head's
                if len(leases) > 1:
                    ids, mask = np.tile(ids, (len(leases), 1)), np.tile(mask, (len(leases), 1))
            item = runtime.batcher.submit([lease.transfer() for lease in leases], ids, mask, job.timeout_s,
                                          tenant=tenant, max_queued_rows=queued_rows, cold_load=cold)
        logits = await runtime.batcher.result(item)
        return Answer(logits.numpy() if hasattr(logits, "numpy") else np.asarray(logits), answers)
