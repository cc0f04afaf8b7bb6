"""A front process: HTTP, auth, validation, tokenization and JSON for classify and embed.

`switchboard serve --fronts N` runs the scheduler process (which is also front 0) and N − 1 of these,
all accepting on the one listening socket the scheduler bound (a front only once it is ready).
A front serves POST /v1/classify, /v1/embed, /v1/rerank and GET /v1/backbone itself — the same middleware and
stages as front 0 — and hands each request's rows to the scheduler over the front link (ZeroMQ).
Every other request (uploads, rollbacks, keys, tenants, jobs, /health, /metrics, the docs) is passed
through, streamed, to the scheduler's own HTTP app on a private Unix socket, so it is answered — and
its 201/200/204 sent — by the one process that owns the books. The front exits when the scheduler does
(a pipe from it closes).

    python -m switchboard.server.http.front CONFIG_JSON
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client import generate_latest
from starlette.types import Receive, Scope, Send

from switchboard.server.core.backbone import default_model_path
from switchboard.server.core.tokenize import TextEncoder
from switchboard.server.http.deps import AppState
from switchboard.server.http.handlers import error_body
from switchboard.server.http.pipeline import Pipeline, SwitchboardAPI
from switchboard.server.http.routers import classify
from switchboard.server.http.stack import install_request_path
from switchboard.server.metrics import Metrics
from switchboard.server.runtime.executors import BoundedExecutor
from switchboard.server.runtime.front_link import RemoteServing
from switchboard.server.settings import Settings

log = logging.getLogger(__name__)
FRONT_PATHS = frozenset({"/v1/classify", "/v1/embed", "/v1/rerank", "/v1/backbone"})
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
                         b"proxy-authorization", b"proxy-authenticate"})


@dataclass(frozen=True)
class FrontConfig:
    index: int
    listen_fd: int  # the listening socket, shared with the scheduler and the other fronts
    parent_fd: int  # the read end of a pipe the scheduler holds open: EOF = the scheduler is gone
    link: str  # the scheduler's ZeroMQ address
    scheduler_http: str  # the scheduler's private HTTP Unix socket
    settings_json: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class PassThrough:
    """Everything a front does not serve itself, streamed to the scheduler's HTTP app and back."""

    def __init__(self, uds: str, front: int, connect_timeout_s: float = 5.0) -> None:
        self._front = (b"x-switchboard-front", str(front).encode())  # the front that took the connection
        self._client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=uds),
                                         timeout=httpx.Timeout(None, connect=connect_timeout_s))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = [(k, v) for k, v in scope["headers"] if k not in _HOP_BY_HOP]

        async def body():  # noqa: ANN202 - the request body as it arrives
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        path = scope.get("raw_path") or scope["path"].encode()
        url = "http://scheduler" + path.decode("latin-1") + (f"?{scope['query_string'].decode('latin-1')}"
                                                           if scope.get("query_string") else "")
        has_body = scope["method"] in ("POST", "PUT", "PATCH")
        request = self._client.build_request(scope["method"], url, headers=headers,
                                             content=body() if has_body else None)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            log.warning("passing %s %s to the scheduler failed: %s", scope["method"], scope["path"][:100], exc)
            out = error_body("scheduler_unavailable", "the scheduler process cannot be reached; retry shortly")
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": out})
            return
        try:
            headers = [(k, v) for k, v in response.headers.raw
                       if k.lower() not in _HOP_BY_HOP and k.lower() != b"x-switchboard-front"]
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [*headers, self._front]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


def listening_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The one socket the scheduler (front 0) and every front accept on, inherited by the fronts. Shared,
    not one SO_REUSEPORT socket each: the kernel then hands a new connection to whichever process is free
    to accept it, so the scheduler's process — which also forms every batch — takes fewer. Measured with
    `bench/front.py` on 2 cores: 1.81× one front's requests/s shared, 0.83–1.12× with SO_REUSEPORT's
    even split (docs/benchmarks.md)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


async def connect(settings: Settings, config: FrontConfig, metrics: Metrics) -> Pipeline:
    """Wait for the scheduler (its hello), load the tokenizer: the stages this front runs."""
    serving = RemoteServing(config.link, config.index, lambda: generate_latest(metrics.registry),
                            auth_cache_s=settings.front_auth_cache_s)
    await serving.connect()
    from transformers import AutoTokenizer  # the tokenizer only: the model stays in the scheduler

    path = str(settings.model or default_model_path())
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, path, local_files_only=True, use_fast=True)
    assert serving.spec is not None
    pool = BoundedExecutor("tokenize", settings.request_threads, max(1, settings.max_queue_rows), metrics,
                           settings.retry_after_s)
    return Pipeline(serving, settings, TextEncoder(tokenizer, serving.spec.max_length), pool)


def create_front_app(settings: Settings, config: FrontConfig, pipeline: Pipeline, metrics: Metrics) -> Any:
    """The ASGI app of front `config.index`: its own classify/embed app, the pass-through for the rest."""
    state = AppState(settings=settings, metrics=metrics, serving=pipeline.serving, pipeline=pipeline,
                     front_index=config.index)
    state.metrics.ready.set(1)
    passthrough = PassThrough(config.scheduler_http, config.index)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        pipeline.serving.close()
        await passthrough.aclose()

    app = SwitchboardAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.switchboard = state
    install_request_path(app, state, front=config.index)
    app.include_router(classify.router)

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in FRONT_PATHS:
            await passthrough(scope, receive, send)
        else:
            await app(scope, receive, send)

    dispatch.state = app.state  # type: ignore[attr-defined]  # uvicorn_config finds the metrics here
    return dispatch


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from switchboard.server.http.edge import uvicorn_config
    from switchboard.server.log_config import configure_logging, logging_config

    config = FrontConfig(**json.loads((argv or sys.argv[1:])[0]))
    settings = Settings.model_validate_json(config.settings_json)
    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per passed-through request otherwise

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server: uvicorn.Server | None = None

        def scheduler_gone() -> None:
            loop.remove_reader(config.parent_fd)
            log.warning("front %d: the scheduler process is gone; stopping", config.index)
            if server is None:
                os._exit(0)
            server.should_exit = True

        loop.add_reader(config.parent_fd, scheduler_gone)
        metrics = Metrics()
        pipeline = await connect(settings, config, metrics)  # accept nothing before the scheduler is ready
        app = create_front_app(settings, config, pipeline, metrics)
        listener = socket.socket(fileno=config.listen_fd)  # accepted on only once ready
        server = uvicorn.Server(uvicorn_config(app, settings, logging_config(settings.log_level, settings.log_format),
                                               lifespan="on"))
        log.info("front %d ready (pid %d)", config.index, os.getpid())
        await server.serve(sockets=[listener])

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
