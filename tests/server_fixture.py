"""Test helpers around a real `switchboard serve`: upload a native adapter, read /metrics."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from switchboard.adapter_store.formats import native
from switchboard.clients.local_server import free_port, running_process
from switchboard.clients.local_server import running_server as _running_server
from switchboard.server.core.backbone import Backbone
from switchboard.server.http.app import create_app
from switchboard.server.http.deps import AppState
from switchboard.server.http.edge import uvicorn_config
from switchboard.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
__all__ = ["ROOT", "free_port", "metric_samples", "running_process", "running_server", "serving_in_thread", "upload"]


def running_server(model_dir: Path | None, data_dir: Path, env: dict[str, str] | None = None,
                   extra_args: list[str] | None = None):
    """`switchboard serve` on a free port; yields (url, process)."""
    return _running_server(data_dir, model_dir, env, extra_args)


def upload(url: str, task: str, adapter, fingerprint: str, headers: dict[str, str] | None = None) -> httpx.Response:
    blob = native.dumps(adapter, fingerprint)
    return httpx.put(f"{url}/v1/tasks/{task}", files=[("files", ("adapter.safetensors", blob))], timeout=30,
                     headers=headers)


def classify_concurrently(url: str, requests: list[tuple[str, list[str]]]) -> list[httpx.Response]:
    """Every (task, texts) request sent at once (raw scores), so the server can batch them together."""

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[
                client.post(f"{url}/v1/classify", json={"task": t, "inputs": x, "raw_scores": True})
                for t, x in requests])

    return asyncio.run(fire())


def metric_samples(url: str) -> dict[str, float]:
    """/metrics parsed with prometheus-client's own parser; every family is switchboard_*, or the process
    collector's process_* / python_info."""
    text = httpx.get(f"{url}/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith(("switchboard_", "process_", "python_")), family.name
        for sample in family.samples:
            key = sample.name + (json.dumps(sample.labels, sort_keys=True) if sample.labels else "")
            out[key] = sample.value
    return out


@contextmanager
def serving_in_thread(data_dir: Path, backbone, **settings) -> Iterator[tuple[str, AppState]]:
    """The real app (uvicorn, HTTP on loopback) in a thread of this process, on a copy of `backbone`:
    start-up in milliseconds, for tests that need HTTP but no separate process. Yields (url, state)."""
    copy = Backbone(model=deepcopy(backbone.model), tokenizer=backbone.tokenizer, spec=backbone.spec)
    config = Settings(data_dir=data_dir, **settings)
    app = create_app(config, backbone_factory=lambda: copy)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn_config(app, config, log_level="warning", timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    state: AppState = app.state.switchboard
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert state.startup_error is None, state.startup_error
            assert time.monotonic() < deadline, "in-thread server not ready"
            time.sleep(0.02)
        yield url, state
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
