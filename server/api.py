"""The HTTP API (DESIGN.md §3): FastAPI app factory, routes and error mapping."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, Form, Path, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapter_store.formats import native
from adapter_store.store import AdapterStore
from adapter_store.upload import parse_upload
from server.backbone import Backbone, load_backbone
from server.batcher import Batcher
from server.engine import CapacityError, Engine
from server.errors import (
    ApiError,
    InsufficientCapacity,
    InvalidAdapter,
    InvalidRequest,
    NotReady,
    PayloadTooLarge,
)
from server.metrics import Metrics
from server.middleware import BodyLimitMiddleware, MetricsMiddleware
from server.registry import Registry, TaskEntry, TaskVersion
from server.schemas import (
    BackboneInfo,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    Health,
    JobList,
    JobSummary,
    Prediction,
    RollbackRequest,
    TaskList,
    TaskSummary,
    TaskVersionSummary,
    TrainRequest,
)
from server.settings import Settings
from server.task_adapter import AdapterValidationError
from server.training_jobs import JobRunner, JobSpec

TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ERRORS = {code: {"model": ErrorResponse} for code in (404, 413, 422, 429, 503)}


@dataclass
class Runtime:
    """What the app holds once the backbone is loaded."""

    engine: Engine
    store: AdapterStore
    registry: Registry
    batcher: Batcher
    jobs: JobRunner


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    runtime: Runtime | None = None
    startup_error: str | None = None


def get_state(request: Request) -> AppState:
    return request.app.state.switchboard


def get_runtime(state: Annotated[AppState, Depends(get_state)]) -> Runtime:
    if state.runtime is None or not state.runtime.batcher.running:
        raise NotReady(state.startup_error or "the backbone is still loading", {"Retry-After": "1"})
    return state.runtime


StateDep = Annotated[AppState, Depends(get_state)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
TaskName = Annotated[str, Path(pattern=TASK_NAME, description="task name", examples=["sentiment"])]


def _start_runtime(state: AppState, backbone_factory: Callable[[], Backbone],
                   on_failure: Callable[[], None] | None) -> None:
    s = state.settings
    try:
        if s.threads > 0:
            torch.set_num_threads(s.threads)
        backbone = backbone_factory()
        engine = Engine(backbone, dtype=torch.bfloat16 if s.dtype == "bf16" else torch.float32,
                        max_adapter_bytes=s.max_adapter_bytes, chunk_rows=s.chunk_rows)
        store = AdapterStore(s.data_dir)
        registry = Registry(engine, state.metrics, store, host_cache_bytes=s.host_cache_bytes)
        registry.restore()
        batcher = Batcher(engine, s, state.metrics, registry.release, after_batch=registry.unload_released)
        batcher.start()

        def register(task: str, blob: bytes) -> dict:
            fingerprint = engine.spec.fingerprint
            adapter = native.loads(blob, fingerprint)
            adapter.validate(engine.spec)  # e.g. a diverged run's non-finite weights never become current
            return registry.put(task, adapter, fingerprint).summary()

        jobs = JobRunner(register, state.metrics, s.model, s.max_length, threads=s.train_threads, nice=s.train_nice,
                         sched_idle=s.train_sched_idle,
                         max_queued=s.max_queued_jobs)
        jobs.start()
        state.runtime = Runtime(engine, store, registry, batcher, jobs)
        state.metrics.ready.set(1)
    except Exception as exc:  # reported by /health and every request as 503
        state.startup_error = f"startup failed: {exc}"
        if on_failure is not None:
            on_failure()
        raise


def create_app(settings: Settings | None = None, backbone_factory: Callable[[], Backbone] | None = None,
               on_startup_failure: Callable[[], None] | None = None) -> FastAPI:
    """`on_startup_failure` runs when loading fails (the CLI stops the server: fail fast, let the
    supervisor see it); without it the app stays up and answers 503 with the reason."""
    settings = settings or Settings()
    state = AppState(settings=settings)
    factory = backbone_factory or (lambda: load_backbone(settings.model, max_length=settings.max_length))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background so /health answers 503 (not a refused connection) while loading.
        loader = threading.Thread(target=_start_runtime, args=(state, factory, on_startup_failure),
                                  daemon=True)
        loader.start()
        yield
        loader.join()
        if state.runtime is not None:
            state.metrics.ready.set(0)
            await asyncio.to_thread(state.runtime.jobs.stop)
            await asyncio.to_thread(state.runtime.batcher.stop)
            state.runtime.store.close()

    app = FastAPI(title="Switchboard", version="0.1.0", lifespan=lifespan,
                  description="Multi-tenant text classification: one frozen encoder, many (IA)3 / Houlsby tasks, "
                              "mixed in one forward pass.")
    app.state.switchboard = state
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       max_upload_bytes=settings.max_upload_bytes, max_train_body_bytes=settings.max_train_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    _install_error_handlers(app, state.metrics)

    @app.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}})
    def health(runtime: RuntimeDep) -> Health:
        return Health(status="ok")

    @app.get("/metrics", response_class=Response)
    def metrics(state: StateDep) -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/backbone", response_model=BackboneInfo, responses=ERRORS)
    def backbone(runtime: RuntimeDep, state: StateDep) -> BackboneInfo:
        return BackboneInfo(**runtime.engine.spec.as_dict())

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS)
    async def classify(body: ClassifyRequest, request: Request, runtime: RuntimeDep,
                       state: StateDep) -> ClassifyResponse:
        s = state.settings
        texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
        if not texts:
            raise InvalidRequest("inputs must hold at least one text")
        if len(texts) > s.max_inputs_per_request:
            raise PayloadTooLarge(f"{len(texts)} inputs; at most {s.max_inputs_per_request} per request")
        version = runtime.registry.acquire(body.task)
        try:
            if version.resident is None:  # evicted or restored from the store: load it off the loop
                await asyncio.to_thread(runtime.registry.ensure_resident, version)
            ids, mask = await asyncio.to_thread(_tokenize, runtime.engine, texts)
        except CapacityError as exc:
            runtime.registry.release(version)
            raise InsufficientCapacity(f"no device slot free for task {body.task!r}: {exc}") from exc
        except BaseException:
            runtime.registry.release(version)
            raise
        submit = asyncio.ensure_future(runtime.batcher.submit(version, ids, mask, s.request_timeout_s))
        watch = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({submit, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not submit.done():  # the client left: drop the request, nobody reads the answer
            submit.cancel()
            return Response(status_code=499)  # type: ignore[return-value]
        logits = submit.result()
        return ClassifyResponse(task=body.task, version=version.version,
                                predictions=_predictions(logits, version, body.raw_scores, body.top_k))

    @app.put("/v1/tasks/{task}", status_code=201, response_model=TaskVersionSummary, responses=ERRORS)
    async def put_task(task: TaskName, runtime: RuntimeDep, state: StateDep,
                       files: Annotated[list[UploadFile], File(description="files of a saved adapter directory")],
                       labels: Annotated[str | None, Form(description="JSON array of label names")] = None,
                       ) -> TaskVersionSummary:
        label_list = _parse_labels(labels, state.settings.max_labels)
        contents: dict[str, bytes] = {}
        for f in files:
            name = f.filename or ""
            if name in contents:
                raise InvalidAdapter(f"file {name!r} uploaded twice")
            contents[name] = await f.read()
        spec = runtime.engine.spec

        def parse_and_load() -> TaskVersion:
            return runtime.registry.put(task, parse_upload(contents, spec, label_list), spec.fingerprint)

        try:
            version = await asyncio.to_thread(parse_and_load)
        except AdapterValidationError as exc:
            raise InvalidAdapter(str(exc)) from exc
        except CapacityError as exc:
            raise InsufficientCapacity(str(exc)) from exc
        return TaskVersionSummary(**version.summary())

    @app.post("/v1/tasks/{task}/rollback", response_model=TaskVersionSummary, responses=ERRORS)
    def rollback_task(task: TaskName, body: RollbackRequest, runtime: RuntimeDep) -> TaskVersionSummary:
        """Make an earlier version current again; requests already admitted finish on their version."""
        return TaskVersionSummary(**runtime.registry.rollback(task, body.version).summary())

    @app.post("/v1/tasks/{task}/train", status_code=202, response_model=JobSummary, responses=ERRORS)
    def train_task(task: TaskName, body: TrainRequest, runtime: RuntimeDep, state: StateDep,
                   response: Response) -> JobSummary:
        """Start a background few-shot (IA)3 job; on success its adapter becomes the task's next version."""
        s = state.settings
        n = len(body.examples) + len(body.eval_examples or [])
        if n > s.max_train_examples:
            raise PayloadTooLarge(f"{n} examples; at most {s.max_train_examples} per job")
        if body.steps > s.max_train_steps:
            raise InvalidRequest(f"steps: at most {s.max_train_steps}")
        labels = {e.label for e in body.examples}
        if len(labels) < 2:
            raise InvalidRequest("examples need at least two distinct labels")
        if len(labels) > s.max_labels:
            raise InvalidRequest(f"at most {s.max_labels} labels")
        unseen = {e.label for e in body.eval_examples or []} - labels
        if unseen:
            raise InvalidRequest(f"eval_examples use labels absent from examples: {sorted(unseen)[:5]}")
        spec = JobSpec(examples=[(e.text, e.label) for e in body.examples],
                       eval_examples=[(e.text, e.label) for e in body.eval_examples] if body.eval_examples else None,
                       steps=body.steps, batch_size=body.batch_size, lr=body.lr, seed=body.seed)
        job = runtime.jobs.submit(task, spec)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return JobSummary(**job.summary())

    @app.get("/v1/jobs", response_model=JobList, responses=ERRORS)
    def list_jobs(runtime: RuntimeDep) -> JobList:
        return JobList(jobs=[JobSummary(**job.summary()) for job in runtime.jobs.list()])

    @app.get("/v1/jobs/{job_id}", response_model=JobSummary, responses=ERRORS)
    def get_job(job_id: str, runtime: RuntimeDep) -> JobSummary:
        return JobSummary(**runtime.jobs.get(job_id).summary())

    @app.delete("/v1/jobs/{job_id}", response_model=JobSummary, responses=ERRORS)
    def cancel_job(job_id: str, runtime: RuntimeDep) -> JobSummary:
        """Cancel a queued or running job (a finished one is left as it is)."""
        return JobSummary(**runtime.jobs.cancel(job_id).summary())

    @app.get("/v1/tasks", response_model=TaskList, responses=ERRORS)
    def list_tasks(runtime: RuntimeDep) -> TaskList:
        return TaskList(tasks=[_summary(entry) for entry in runtime.registry.snapshot()])

    @app.get("/v1/tasks/{task}", response_model=TaskSummary, responses=ERRORS)
    def get_task(task: TaskName, runtime: RuntimeDep) -> TaskSummary:
        return _task_summary(runtime.registry, task)

    @app.delete("/v1/tasks/{task}", status_code=204, response_class=Response, responses=ERRORS)
    def delete_task(task: TaskName, runtime: RuntimeDep) -> Response:
        runtime.registry.delete(task)
        return Response(status_code=204)

    return app


def _tokenize(engine: Engine, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One batched call into the Rust tokenizer, run off the event loop; truncates to the spec's limit."""
    enc = engine.backbone.tokenizer(texts, padding=True, truncation=True, max_length=engine.spec.max_length,
                                    return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


async def _client_gone(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _predictions(logits: torch.Tensor, version: TaskVersion, raw: bool, top_k: int | None) -> list[list[Prediction]]:
    scores = logits[:, : len(version.labels)]
    if not raw:
        scores = torch.softmax(scores, dim=-1)
    k = min(top_k or len(version.labels), len(version.labels))
    values, indices = torch.topk(scores, k, dim=-1)
    labels = version.labels
    return [[Prediction(label=labels[i], score=v) for v, i in zip(vals, idx)]
            for vals, idx in zip(values.tolist(), indices.tolist())]


def _parse_labels(labels: str | None, max_labels: int) -> list[str] | None:
    if labels is None or labels == "":
        return None
    try:
        value = json.loads(labels)
    except json.JSONDecodeError as exc:
        raise InvalidRequest("labels must be a JSON array of strings") from exc
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise InvalidRequest("labels must be a JSON array of non-empty strings")
    if len(value) > max_labels:
        raise InvalidRequest(f"at most {max_labels} labels")
    return value


def _task_summary(registry: Registry, task: str) -> TaskSummary:
    return _summary(registry.get(task))


def _summary(entry: TaskEntry) -> TaskSummary:
    cur = entry.current
    return TaskSummary(**cur.summary(), created_at=cur.created_at,
                       versions=[TaskVersionSummary(**v.summary()) for v in entry.versions])


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def error(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.failures.labels(type_).inc()
        return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(422, "validation_error", f"{where}: {first.get('msg', 'invalid request')}".strip(": "))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code,
                                                                                           "http_error")
        return error(exc.status_code, kind, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error(500, "internal_error", f"{type(exc).__name__}: {exc}")
