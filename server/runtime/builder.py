"""Wire the runtime from settings: backbone → engine → store → registry → batcher → training jobs."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from switchboard.adapter_store.formats import native
from switchboard.adapter_store.limits import UploadLimits
from switchboard.adapter_store.store import Store, open_store
from switchboard.server.core import memory
from switchboard.server.core.backbone import Backbone, default_model_path, load_backbone
from switchboard.server.core.engine import Engine, default_device
from switchboard.server.core.precision import resolve
from switchboard.server.metrics import Metrics
from switchboard.server.runtime import device_defaults
from switchboard.server.runtime.batcher import Batcher
from switchboard.server.runtime.embedding import Embeddings
from switchboard.server.runtime.executors import BoundedExecutor
from switchboard.server.runtime.process_engine import ProcessEngine
from switchboard.server.runtime.registry import Registry
from switchboard.server.runtime.replication import StoreFollower
from switchboard.server.runtime.tenancy import Quotas, Tenancy
from switchboard.server.runtime.training.jobs import JobRunner
from switchboard.server.settings import Settings

log = logging.getLogger(__name__)

BackboneFactory = Callable[[], Backbone]
EngineFactory = Callable[[Backbone, Settings], Engine]  # benches: a stand-in engine (bench/front.py)


@dataclass
class Runtime:
    """Everything that serves once the backbone is loaded."""

    engine: Engine | ProcessEngine
    store: Store
    registry: Registry
    batcher: Batcher
    jobs: JobRunner
    request_pool: BoundedExecutor  # tokenizing requests, loading evicted adapters
    upload_pool: BoundedExecutor  # parsing and storing uploads
    upload_limits: UploadLimits
    tenancy: Tenancy
    follower: StoreFollower
    embedding: Embeddings

    @property
    def ready(self) -> bool:
        return self.batcher.running

    def stop(self) -> None:
        """Training jobs first (cancelled), then the batcher (admitted requests finish), then the store."""
        self.jobs.stop()
        self.follower.stop()
        self.batcher.stop()
        if isinstance(self.engine, ProcessEngine):
            self.engine.stop()
        self.upload_pool.shutdown()
        self.request_pool.shutdown()
        self.store.close()


def default_backbone_factory(settings: Settings) -> BackboneFactory:
    return lambda: load_backbone(settings.model, max_length=settings.max_length)


def default_workers(device: torch.device) -> int:
    """One worker per GPU; on a CPU two workers (each with half the cores) beat one with all of them:
    no OpenMP barrier waits for a thread the front process preempted (docs/benchmarks.md)."""
    return 1 if device.type == "cuda" else min(os.cpu_count() or 1, 2)


def build_engine(settings: Settings, metrics: Metrics, store: Store, backbone_factory: BackboneFactory | None,
                 engine_factory: EngineFactory | None = None) -> tuple[Backbone, Engine | ProcessEngine]:
    """The backbone, and the engine in `engine_workers` worker processes — launched first, so they load
    the model while this process loads its own copy — or in this process (`engine_workers` 0, or a
    backbone handed over as an object, which a worker process could not load)."""
    s = settings
    device = default_device()
    precision = resolve(s.dtype, device)
    workers = 0 if backbone_factory is not None else default_workers(device) if s.engine_workers is None \
        else s.engine_workers
    threads = s.threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    if engine_factory is not None:
        backbone = (backbone_factory or default_backbone_factory(s))()
        return backbone, engine_factory(backbone, s)
    if workers == 0:
        torch.set_num_threads(threads)
        backbone = (backbone_factory or default_backbone_factory(s))()
        return backbone, Engine(backbone, precision=precision, device=device, max_adapter_bytes=s.max_adapter_bytes,
                                chunk_rows=s.chunk_rows)
    torch.set_num_threads(1)  # the front only tokenizes and post-processes; the cores are the workers'
    engine = ProcessEngine(str(s.model or default_model_path()), store.read_blob, metrics, max_length=s.max_length,
                           precision=precision, device=device, max_adapter_bytes=s.max_adapter_bytes,
                           chunk_rows=s.chunk_rows, workers=workers, threads=threads,
                           timeout_s=s.engine_timeout_s, log_level=s.log_level, log_format=s.log_format,
                           nice=s.engine_nice)
    engine.launch()
    try:
        backbone = default_backbone_factory(s)()
        engine.start(backbone)
    except BaseException:
        engine.stop()
        raise
    return backbone, engine


def build_runtime(settings: Settings, metrics: Metrics, backbone_factory: BackboneFactory | None = None,
                  engine_factory: EngineFactory | None = None) -> Runtime:
    """Blocking (loads the model): run it off the event loop."""
    s = settings = device_defaults.for_device(settings, default_device())
    memory.limit_arenas(2)  # before the pools' threads allocate
    store = open_store(s.store, s.data_dir, s.store_connect_timeout_s)
    try:
        backbone, engine = build_engine(s, metrics, store, backbone_factory, engine_factory)
    except BaseException:
        store.close()
        raise
    embeddings = Embeddings(engine)  # before the registry's tasks: the built-in slot is never evicted
    registry = Registry(engine, metrics, store, host_cache_bytes=s.host_cache_bytes)
    restored = registry.restore()
    trim = memory.periodic_trim(10.0)

    def housekeeping() -> None:
        """Between batches: unload retired versions; now and then hand freed memory back."""
        registry.unload_released()
        trim()

    batcher = Batcher(engine, s, metrics, after_batch=housekeeping)
    batcher.drain.observe(*engine.warm_up())
    batcher.start()

    tenancy = Tenancy(store, admin_key(s), Quotas(s.tenant_max_tasks, s.tenant_max_adapter_bytes,
                                                  s.tenant_max_queued_rows))
    follower = StoreFollower(store, registry, tenancy, metrics, resync_s=s.store_resync_s)
    follower.start()

    def register(tenant: str, task: str, blob: bytes) -> dict:
        """A training job's result becomes the task's next version, like an upload."""
        fingerprint = engine.spec.fingerprint
        adapter = native.loads(blob, fingerprint)
        adapter.validate(engine.spec)  # e.g. a diverged run's non-finite weights never become current
        return registry.put((tenant, task), adapter, fingerprint, tenancy.quotas(tenant).storage).summary()

    jobs = JobRunner(register, metrics, s.model, s.max_length, threads=s.train_threads, nice=s.train_nice,
                     sched_idle=s.train_sched_idle, max_queued=s.max_queued_jobs,
                     tenant_max_queued=s.tenant_max_queued_jobs, tenant_keep_finished=s.tenant_keep_finished_jobs,
                     max_memory_bytes=s.train_max_memory_bytes, max_seconds=s.train_max_seconds)
    jobs.start()
    spec = engine.spec
    workers = (f"{len(engine.workers)} engine worker processes × {engine.workers[0].config.threads} torch threads"
               if isinstance(engine, ProcessEngine) else f"in-process engine, {torch.get_num_threads()} torch threads")
    log.info("ready: model %s (%s, %d layers, max_length %d, %s), precision %s (setting %s), %s on %s; "
             "store %s with %d tasks; slot budget %d MiB",
             spec.name, spec.model_type, spec.num_layers, spec.max_length, spec.fingerprint, engine.precision, s.dtype,
             workers, engine.device,
             store.url if store.url != "sqlite" else f"sqlite in {s.data_dir.resolve()}", restored,
             s.max_adapter_bytes >> 20)
    limits = UploadLimits(max_labels=s.max_labels, max_label_length=s.max_label_length,
                          max_task_bytes=s.max_task_bytes, max_files=s.max_upload_files)
    request_pool = BoundedExecutor("request", s.request_threads, max(1, s.max_queue_rows), metrics, s.retry_after_s)
    upload_pool = BoundedExecutor("upload", s.upload_threads, s.max_pending_uploads, metrics, s.retry_after_s)
    mode = "open mode: no API keys, one tenant 'default'" if tenancy.open_mode else (
        f"auth mode: {len(tenancy.tenant_names())} tenants, {len(tenancy.api_keys())} keys")
    log.info("tenancy: %s; scheduler %s", mode, s.scheduler)
    return Runtime(engine, store, registry, batcher, jobs, request_pool, upload_pool, limits, tenancy, follower,
                   embeddings)


def admin_key(settings: Settings) -> str | None:
    """SWITCHBOARD_ADMIN_KEY, or the first line of --admin-key-file; None → open mode."""
    if settings.admin_key_file is not None:
        key = settings.admin_key_file.read_text().strip()
        if not key:
            raise ValueError(f"admin key file {settings.admin_key_file} is empty")
        return key
    return settings.admin_key.get_secret_value() if settings.admin_key is not None else None

