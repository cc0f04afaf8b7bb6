"""Start a real `switchboard serve` (uvicorn) — or any server command — on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from adapter_store.formats import native

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_process(cmd: list[str], url: str, log_path: Path, env: dict[str, str] | None = None,
                    ready_timeout: float = 120.0):
    """Run `cmd` until `url`/health answers 200; yields (process, seconds to ready); terminates it after."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited: {log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() - start > ready_timeout:
                    raise RuntimeError("server not ready in time")
                time.sleep(0.05)
            yield proc, time.monotonic() - start
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


@contextmanager
def running_server(model_dir: Path | None, data_dir: Path, env: dict[str, str] | None = None,
                   extra_args: list[str] | None = None):
    """`switchboard serve` on a free port; yields (url, process)."""
    port = free_port()
    cmd = [sys.executable, "-m", "clients.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
           "--log-level", "warning", *(extra_args or [])]
    if model_dir is not None:
        cmd += ["--model", str(model_dir)]
    url = f"http://127.0.0.1:{port}"
    with running_process(cmd, url, data_dir / "server.log", env) as (proc, _):
        yield url, proc


def upload(url: str, task: str, adapter, fingerprint: str) -> httpx.Response:
    blob = native.dumps(adapter, fingerprint)
    return httpx.put(f"{url}/v1/tasks/{task}", files=[("files", ("adapter.safetensors", blob))], timeout=30)


def metric_samples(url: str) -> dict[str, float]:
    """/metrics parsed with prometheus-client's own parser; every family must be switchboard_*."""
    text = httpx.get(f"{url}/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("switchboard_"), family.name
        for sample in family.samples:
            key = sample.name + (json.dumps(sample.labels, sort_keys=True) if sample.labels else "")
            out[key] = sample.value
    return out
