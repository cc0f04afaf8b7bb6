"""Prometheus metrics with bounded label sets (no per-task labels), one registry per app, plus the
process collector's process_* and python_info families."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # process_* (resident memory, CPU seconds, open fds) and python_info: what operators alert on
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter("switchboard_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.failures = Counter("switchboard_request_failures", "Failed requests by error type", ["type"], registry=r)
        self.request_duration = Histogram("switchboard_request_duration_seconds", "Request latency",
                                          ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_duration = Histogram("switchboard_queue_duration_seconds",
                                        "Time a classify request waited before its batch started",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.inference_duration = Histogram("switchboard_inference_duration_seconds",
                                            "Forward pass time per batch", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("switchboard_batch_rows", "Rows per batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 48, 64, 128, 256), registry=r)
        self.batch_tokens = Histogram("switchboard_batch_tokens", "Real (unpadded) tokens per batch",
                                      buckets=(32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384), registry=r)
        self.batch_padding = Histogram("switchboard_batch_padding_fraction",
                                       "Fraction of computed positions that were padding",
                                       buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0), registry=r)
        self.batch_tasks = Histogram("switchboard_batch_tasks", "Distinct tasks per batch",
                                     buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batches = Counter("switchboard_batches", "Forward passes run", registry=r)
        self.dropped = Counter("switchboard_dropped_requests",
                               "Requests refused or dropped before inference: queue_full, queue_delay, client_gone, "
                               "deadline", ["reason"], registry=r)
        self.queue_depth = Gauge("switchboard_queue_depth_rows", "Rows waiting in the batcher queue", registry=r)
        self.queue_tokens = Gauge("switchboard_queue_tokens", "Tokens (rows × length) waiting in the batcher queue",
                                  registry=r)
        self.drain_rate = Gauge("switchboard_drain_tokens_per_second",
                                "Tokens per second the inference worker computes (moving average)", registry=r)
        self.executor_pending = Gauge("switchboard_executor_pending", "Jobs running or waiting in a thread pool",
                                      ["pool"], registry=r)
        self.resident_adapters = Gauge("switchboard_resident_adapters", "Task versions resident in device slots",
                                       registry=r)
        self.resident_bytes = Gauge("switchboard_resident_adapter_bytes", "Bytes of resident task parameters",
                                    registry=r)
        self.slot_pools = Gauge("switchboard_slot_pools", "Slot pools allocated (one per module shape in use)",
                                registry=r)
        self.registered_tasks = Gauge("switchboard_registered_tasks", "Tasks with a current version", registry=r)
        self.adapter_loads = Counter("switchboard_adapter_loads", "Adapter loads into device slots", registry=r)
        self.adapter_load_duration = Histogram("switchboard_adapter_load_duration_seconds",
                                               "Time to parse, validate and load an adapter",
                                               buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_evictions = Counter("switchboard_adapter_evictions", "Versions evicted from device slots",
                                         registry=r)
        self.eviction_age = Histogram("switchboard_adapter_eviction_age_seconds",
                                      "How long an evicted version had been resident",
                                      buckets=(1, 10, 60, 300, 1800, 3600, 21600, 86400), registry=r)
        self.host_cache_bytes = Gauge("switchboard_host_cache_bytes", "Bytes of parsed adapters in the host cache",
                                      registry=r)
        self.train_jobs = Counter("switchboard_train_jobs", "Finished training jobs by outcome", ["outcome"],
                                  registry=r)
        self.train_jobs_active = Gauge("switchboard_train_jobs_active", "Training jobs queued or running",
                                       registry=r)
        # per tenant: the label is bounded (tenants are created by the admin); never a task name
        self.tenant_requests = Counter("switchboard_tenant_requests", "Classify requests admitted, per tenant",
                                       ["tenant"], registry=r)
        self.tenant_rows = Counter("switchboard_tenant_rows", "Rows computed, per tenant", ["tenant"], registry=r)
        self.tenant_tokens = Counter("switchboard_tenant_tokens", "Tokens (rows × length) computed, per tenant",
                                     ["tenant"], registry=r)
        self.tenant_throttled = Counter("switchboard_tenant_throttled", "Requests refused with 429, per tenant",
                                        ["tenant"], registry=r)
        self.tenant_vtc = Gauge("switchboard_tenant_vtc_tokens", "The scheduler's virtual token counter, per tenant",
                                ["tenant"], registry=r)
        self.store_changes = Counter("switchboard_store_changes", "Changes from a shared store applied (task, keys, "
                                     "tenants, resync)", ["kind"], registry=r)
        self.store_up = Gauge("switchboard_store_up", "1 while the store can be reached", registry=r)
        self.engine_workers = Gauge("switchboard_engine_workers", "Engine worker processes running (0: the engine "
                                    "runs inside the server process)", registry=r)
        self.engine_restarts = Counter("switchboard_engine_worker_restarts", "Engine workers restarted after dying "
                                       "or hanging", registry=r)
        self.http_refused = Counter("switchboard_http_refused", "Connections or requests refused at the HTTP edge "
                                    "(header_too_large, url_too_long, header_timeout, body_timeout, "
                                    "too_many_connections) or before their body was read (unauthorized, "
                                    "uploads_pending)", ["reason"], registry=r)
        self.fronts = Gauge("switchboard_front_processes", "HTTP front processes running besides the scheduler's own",
                            registry=r)
        self.front_restarts = Counter("switchboard_front_restarts", "Front processes restarted after dying",
                                      registry=r)
        self.ready = Gauge("switchboard_ready", "1 once the backbone is loaded and the batcher runs", registry=r)


class MergedRegistry:
    """This process's metrics plus the front processes' (their Prometheus text): samples with the same
    name and labels are summed — counters and histograms add up across processes — so one scrape of
    /metrics sees the whole server. From the fronts only `switchboard_*` families are taken (process_*
    and python_info describe the scheduler's process); `_created` samples stay this process's."""

    def __init__(self, own: CollectorRegistry, fronts: Iterable[bytes]) -> None:
        self._own = own
        self._fronts = list(fronts)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple, float]] = {}
        for family in self._own.collect():
            families[family.name] = family
            values[family.name] = {(x.name, tuple(sorted(x.labels.items()))): x.value for x in family.samples}
        for text in self._fronts:
            for family in text_string_to_metric_families(text.decode("utf-8")):
                if not family.name.startswith("switchboard_"):
                    continue
                if family.name not in families:
                    families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                    values[family.name] = {}
                merged = values[family.name]
                for x in family.samples:
                    if x.name.endswith("_created"):
                        continue
                    key = (x.name, tuple(sorted(x.labels.items())))
                    merged[key] = merged.get(key, 0.0) + x.value
        for name, family in families.items():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for (sample, labels), value in values[name].items():
                out.add_sample(sample, dict(labels), value)
            yield out
