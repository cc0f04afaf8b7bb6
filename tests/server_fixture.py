"""Start a real `switchboard serve` (uvicorn) on a free loopback port for tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(model_dir: Path | None, data_dir: Path, env: dict[str, str] | None = None,
                   ready_timeout: float = 60.0):
    port = free_port()
    cmd = [sys.executable, "-m", "clients.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
           "--log-level", "warning"]
    if model_dir is not None:
        cmd += ["--model", str(model_dir)]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    log = open(data_dir / "server.log", "wb")
    proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=Path(__file__).resolve().parent.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {(data_dir / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready in time")
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
