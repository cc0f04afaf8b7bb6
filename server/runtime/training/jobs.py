"""Few-shot training jobs: an (IA)3 adapter trained in a separate low-priority process, then registered.

Training runs in its own process (spawned, `nice`d, limited to `train_threads` torch threads) so it can
neither hold the serving process's GIL nor take more than its share of the cores: the kernel gives the
serving process the CPU whenever both want it. One job trains at a time; the rest wait in a bounded
queue, of which one tenant may fill only its share (`tenant_max_queued_jobs`); each tenant keeps its
own last finished jobs (`tenant_keep_finished_jobs`), so no tenant's traffic refuses or forgets
another's. The trained file goes through the same `Registry.put` as an upload (validation, durable
store, slot load, version switch). Job records live in memory only: a job running at a crash is lost
(its examples were never stored), a version it registered is not.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import queue
import resource
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from multiprocessing.connection import Connection
from pathlib import Path

from switchboard.server.errors import ApiError, Overloaded
from switchboard.server.metrics import Metrics
from switchboard.server.runtime.training.data import Example, default_pooling

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)


class JobNotFound(ApiError):
    status, type = 404, "job_not_found"


@dataclass
class JobSpec:
    """What the client asked for: examples plus the few-shot (IA)3 recipe's knobs."""

    examples: list[Example]  # (text or (text, text_pair), label)
    eval_examples: list[Example] | None = None
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0
    choices: tuple[str, ...] | None = None  # T5 backbones: rank classification over these (T-Few)
    template: str | None = None


@dataclass
class Job:
    id: str
    tenant: str
    task: str
    spec: JobSpec | None  # dropped once the job finishes: examples are not kept
    status: str = QUEUED
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    result: dict | None = None
    error: str | None = None
    cancel_requested: bool = False

    def summary(self) -> dict:
        """The public fields (not asdict: that would deep-copy the examples on every poll)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("spec", "cancel_requested", "tenant")}


Register = Callable[[str, str, bytes], dict]  # (tenant, task, native adapter bytes) → version summary


# how running out of address space shows up: allocator errors, mmap of weights, mapping shared libraries
_OUT_OF_MEMORY = ("allocate memory", "bad_alloc", "failed to map segment", "cannot allocate")


def _near_address_space_limit(limit_bytes: int, margin: float = 0.9) -> bool:
    """Whether this process's peak address space came within `margin` of its limit: C extensions
    failing an allocation under RLIMIT_AS often raise something other than MemoryError (a bare
    SystemError, an ImportError), so the peak is the reliable sign."""
    try:
        for line in open("/proc/self/status").read().splitlines():  # noqa: SIM115 - a tiny procfs read
            if line.startswith("VmPeak:"):
                return int(line.split()[1]) * 1024 >= margin * limit_bytes
    except (OSError, ValueError, IndexError):
        pass
    return False


@dataclass(frozen=True)
class Sandbox:
    """What a training process may take: threads, priority, address space."""

    threads: int = 1
    nice: int = 19
    sched_idle: bool = True
    max_memory_bytes: int = 6 << 30


def _train_in_child(conn: Connection, model_path: str | None, max_length: int | None, spec: JobSpec,
                    sandbox: Sandbox) -> None:
    """Child process entry point: limits and priority first, then load, train, send back."""
    try:
        resource.setrlimit(resource.RLIMIT_AS, (sandbox.max_memory_bytes, sandbox.max_memory_bytes))
        os.nice(sandbox.nice)
        if sandbox.sched_idle and hasattr(os, "sched_setscheduler"):  # Linux: run only on otherwise idle cores
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        import torch

        torch.set_num_threads(sandbox.threads)
        from switchboard.adapter_store.formats import native
        from switchboard.server.core.backbone import load_backbone
        from switchboard.server.runtime.training.trainer import TrainConfig, train

        backbone = load_backbone(model_path, max_length=max_length)
        # without eval_examples the job scores its training examples: no temperature is fitted on those
        cfg = TrainConfig(kind="ia3", steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed,
                          pooling=default_pooling(spec.examples), calibrate=spec.eval_examples is not None,
                          choices=spec.choices, template=spec.template)
        eval_examples = spec.eval_examples or spec.examples  # few-shot: no examples to spare for a split
        adapter, report = train(backbone, spec.examples, cfg, eval_examples, progress=False,
                                on_step=lambda step, total, loss: conn.send(("progress", step, total, loss)))
        summary = {k: report[k] for k in ("accuracy", "macro_f1", "params", "train_seconds", "steps")}
        summary["evaluated_on"] = "eval_examples" if spec.eval_examples else "training examples"
        conn.send(("done", native.dumps(adapter, backbone.spec.fingerprint), summary))
    except Exception as exc:  # reported as the job's error (ImportError too: a library that cannot map)
        message = f"{type(exc).__name__}: {exc}"[:500]
        if (isinstance(exc, MemoryError) or any(sign in message.lower() for sign in _OUT_OF_MEMORY)
                or (sandbox.max_memory_bytes and _near_address_space_limit(sandbox.max_memory_bytes))):
            message = (f"the training process ran out of its {sandbox.max_memory_bytes >> 20} MiB memory limit "
                       f"(train_max_memory_bytes); use fewer or shorter examples or a smaller batch_size ({message})")
        conn.send(("error", message))
    finally:
        conn.close()


class JobRunner:
    def __init__(self, register: Register, metrics: Metrics, model_path: Path | None, max_length: int | None,
                 threads: int = 1, nice: int = 19, sched_idle: bool = True, max_queued: int = 8,
                 keep_finished: int = 4096, max_memory_bytes: int = 6 << 30, max_seconds: float = 3600.0,
                 tenant_max_queued: int = 4, tenant_keep_finished: int = 64) -> None:
        self._register = register
        self._metrics = metrics
        self._model_path = str(model_path) if model_path else None
        self._max_length = max_length
        self._sandbox = Sandbox(threads, nice, sched_idle, max_memory_bytes)
        self._max_seconds = max_seconds
        self._max_queued = max_queued
        # all tenants together (a finished record is ~1 KB, its examples dropped): past it, the tenant
        # keeping the most loses its oldest, so tenants within their share keep theirs
        self._keep_finished = keep_finished
        self._tenant_max_queued = tenant_max_queued
        self._tenant_keep_finished = tenant_keep_finished
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._finished: dict[str, collections.deque[str]] = {}  # tenant → its finished job ids, oldest first
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._worker = threading.Thread(target=self._run, name="train-jobs", daemon=True)
        self._stopping = False

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        """Cancel what runs and what waits (their examples are not stored anywhere)."""
        with self._lock:
            self._stopping = True
            for job in self._jobs.values():
                job.cancel_requested = True
        self._queue.put(None)
        if self._worker.is_alive():
            self._worker.join(timeout=30)

    def submit(self, tenant: str, task: str, spec: JobSpec) -> Job:
        with self._lock:
            waiting = [job.tenant for job in self._jobs.values() if job.status == QUEUED]
            mine = waiting.count(tenant)
            if not self._stopping and mine >= self._tenant_max_queued:
                raise Overloaded(f"{mine} training jobs of this tenant already queued; at most "
                                 f"{self._tenant_max_queued} per tenant (tenant_max_queued_jobs); retry later",
                                 {"Retry-After": "30"})
            if self._stopping or len(waiting) >= self._max_queued:
                raise Overloaded(f"{len(waiting)} training jobs already queued (max_queued_jobs); retry later",
                                 {"Retry-After": "30"})
            job = Job(id=uuid.uuid4().hex, tenant=tenant, task=task, spec=spec, total_steps=spec.steps)
            self._jobs[job.id] = job
            self._count_active()
        self._queue.put(job)
        return job

    def get(self, tenant: str, job_id: str) -> Job:
        """Another tenant's job is not found, exactly like a job that does not exist."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.tenant != tenant:
            raise JobNotFound(f"unknown job {job_id!r}")
        return job

    def list(self, tenant: str) -> list[Job]:
        with self._lock:
            return [job for job in self._jobs.values() if job.tenant == tenant]

    def cancel(self, tenant: str, job_id: str) -> Job:
        job = self.get(tenant, job_id)
        with self._lock:
            if job.status == QUEUED:
                self._finish(job, CANCELLED, error="cancelled by a client")
            elif job.status == RUNNING:
                job.cancel_requested = True
        return job

    def _forget_old(self, tenant: str) -> None:
        """Forget the oldest finished jobs of `tenant` past its own allowance; past the overall one, those
        of whichever tenant keeps the most: one tenant's churn never evicts another's few records."""
        own = self._finished.get(tenant)
        while own and len(own) > self._tenant_keep_finished:
            del self._jobs[own.popleft()]
        while sum(map(len, self._finished.values())) > self._keep_finished:
            largest = max(self._finished.values(), key=len)
            del self._jobs[largest.popleft()]
        for name in [name for name, ids in self._finished.items() if not ids]:
            del self._finished[name]

    def _finish(self, job: Job, status: str, result: dict | None = None, error: str | None = None) -> None:
        job.status, job.result, job.error, job.finished_at, job.spec = status, result, error, time.time(), None
        self._finished.setdefault(job.tenant, collections.deque()).append(job.id)
        self._forget_old(job.tenant)
        if status == FAILED:
            log.warning("training job %s for task %r failed: %s", job.id, job.task, error)
        else:
            log.info("training job %s for task %r %s", job.id, job.task, status)
        self._metrics.train_jobs.labels(status).inc()
        self._count_active()

    def _count_active(self) -> None:
        self._metrics.train_jobs_active.set(sum(j.status not in FINISHED for j in self._jobs.values()))

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                if job.status != QUEUED:
                    continue
                if job.cancel_requested:
                    self._finish(job, CANCELLED, error="server shutting down")
                    continue
                job.status, job.started_at = RUNNING, time.time()
            try:
                status, result, error = self._train(job)
            except Exception as exc:  # never let one job stop the worker
                log.exception("training job %s crashed in the server", job.id)
                status, result, error = FAILED, None, f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._finish(job, status, result, error)

    def _died(self, exitcode: int | None) -> str:
        return (f"the training process exited with code {exitcode} before reporting (it may have hit its "
                f"{self._sandbox.max_memory_bytes >> 20} MiB memory limit, train_max_memory_bytes)")

    def _train(self, job: Job) -> tuple[str, dict | None, str | None]:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_train_in_child, name=f"train-{job.id[:8]}", daemon=True,
                              args=(child, self._model_path, self._max_length, job.spec, self._sandbox))
        process.start()
        child.close()
        deadline = time.monotonic() + self._max_seconds
        try:
            while True:
                if job.cancel_requested:
                    return CANCELLED, None, "cancelled by a client" if not self._stopping else "server shutting down"
                if time.monotonic() > deadline:
                    return FAILED, None, (f"stopped after its wall-time limit of {self._max_seconds:g} s "
                                          f"(train_max_seconds) at step {job.step} of {job.total_steps}")
                if not parent.poll(0.2):
                    if not process.is_alive() and not parent.poll(0):
                        return FAILED, None, self._died(process.exitcode)
                    continue
                try:
                    message = parent.recv()
                except EOFError:
                    process.join(5)
                    return FAILED, None, self._died(process.exitcode)
                if message[0] == "progress":
                    _, job.step, job.total_steps, job.loss = message
                elif message[0] == "error":
                    return FAILED, None, message[1]
                else:
                    _, blob, summary = message
                    try:
                        version = self._register(job.tenant, job.task, blob)
                    except ApiError as exc:
                        return FAILED, None, f"registering the trained adapter failed: {exc.message}"
                    except Exception as exc:
                        log.exception("registering the adapter of training job %s failed", job.id)
                        return FAILED, None, f"registering the trained adapter failed: {type(exc).__name__}: {exc}"
                    return SUCCEEDED, {**summary, **version}, None
        finally:
            parent.close()
            if process.is_alive():
                process.terminate()
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
