"""The HTTP API (DESIGN.md §3): the app factory — lifespan, middleware, error handlers, routers."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from switchboard.server import __version__
from switchboard.server.core.tokenize import TextEncoder
from switchboard.server.http.deps import AppState
from switchboard.server.http.docs_ui import install_docs
from switchboard.server.http.fronts import Fronts
from switchboard.server.http.pipeline import Pipeline, SwitchboardAPI
from switchboard.server.http.routers import admin, classify, jobs, ops, tasks
from switchboard.server.http.stack import install_request_path
from switchboard.server.metrics import Metrics
from switchboard.server.runtime.builder import BackboneFactory, EngineFactory, build_runtime
from switchboard.server.runtime.serving import LocalServing
from switchboard.server.settings import Settings

log = logging.getLogger(__name__)


def _start_runtime(state: AppState, backbone_factory: BackboneFactory | None,
                   on_failure: Callable[[], None] | None, engine_factory: EngineFactory | None = None) -> None:
    try:
        runtime = build_runtime(state.settings, state.metrics, backbone_factory, engine_factory)
        serving = LocalServing(runtime)
        encoder = TextEncoder(runtime.engine.backbone.tokenizer, serving.spec.max_length)
        state.pipeline = Pipeline(serving, state.settings, encoder, runtime.request_pool)
        state.runtime, state.serving = runtime, serving
        state.metrics.ready.set(1)
    except Exception as exc:  # reported by /health and every request as 503
        log.exception("start-up failed")
        state.startup_error = f"startup failed: {exc}"
        if on_failure is not None:
            on_failure()


def create_app(settings: Settings | None = None, backbone_factory: BackboneFactory | None = None,
               on_startup_failure: Callable[[], None] | None = None,
               engine_factory: EngineFactory | None = None, fronts: Fronts | None = None,
               metrics: Metrics | None = None) -> FastAPI:
    """`on_startup_failure` runs when loading fails (the CLI stops the server: fail fast, let the
    supervisor see it); without it the app stays up and answers 503 with the reason."""
    state = AppState(settings=settings or Settings(), metrics=metrics or Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background so /health answers 503 (not a refused connection) while loading.
        loader = threading.Thread(target=_start_runtime, name="switchboard-startup", daemon=True,
                                  args=(state, backbone_factory, on_startup_failure, engine_factory))
        loader.start()
        if fronts is not None:
            fronts.start(lambda: state.serving)
        yield
        if fronts is not None:  # their requests in flight still reach this process's scheduler
            await fronts.stop(state.settings.request_timeout_s)
        await asyncio.to_thread(loader.join)
        if state.runtime is not None:
            state.metrics.ready.set(0)
            log.info("shutting down: cancelling training jobs, finishing admitted requests")
            await asyncio.to_thread(state.runtime.stop)

    app = SwitchboardAPI(title="Switchboard", version=__version__, lifespan=lifespan, docs_url=None,
                         redoc_url=None, description="Multi-tenant text classification: one frozen encoder, many "
                                                     "(IA)3 / Houlsby tasks, mixed in one forward pass.")
    app.state.switchboard = state
    state.fronts = fronts
    install_request_path(app, state, front=0 if fronts is not None else None)
    install_docs(app)  # Swagger UI from the package: works offline
    # classify first: routes are matched router by router, and it carries nearly all the traffic
    for router in (classify.router, ops.router, tasks.router, jobs.router, admin.router):
        app.include_router(router)
    return app
