"""Run a Switchboard server (or any HTTP server) as a child process on a free loopback port.

Shared by the tests, the benchmarks and anyone scripting a local server: start, wait until
`/health` answers 200, and always stop it (SIGTERM, then SIGKILL) when the block ends.
Needs only httpx and the standard library.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_process(cmd: list[str], url: str, log_path: Path, env: dict[str, str] | None = None,
                    ready_timeout: float = 120.0, cwd: Path | None = None) -> Iterator[tuple[subprocess.Popen, float]]:
    """Run `cmd` until `url`/health answers 200; yields (process, seconds to ready); stops it after."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with code {proc.returncode}: {log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() - start > ready_timeout:
                    raise RuntimeError(f"server not ready within {ready_timeout:.0f} s; /health said "
                                       f"{_health(url)}; its threads: {_stacks(proc, log_path)}")
                time.sleep(0.05)
            yield proc, time.monotonic() - start
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _health(url: str) -> str:
    try:
        r = httpx.get(f"{url}/health", timeout=2)
        return f"{r.status_code} {r.text[:300]}"
    except httpx.HTTPError as exc:
        return f"nothing ({type(exc).__name__})"


def _stacks(proc: subprocess.Popen, log_path: Path) -> str:
    """Ask a `switchboard serve` that is not ready for every thread's stack (SIGUSR1, faulthandler) and
    return the end of its log with them."""
    if proc.poll() is None and sys.platform != "win32":
        import signal

        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
    return log_path.read_text(errors="replace")[-6000:]


@contextmanager
def running_server(data_dir: Path, model_dir: Path | None = None, env: dict[str, str] | None = None,
                   extra_args: list[str] | None = None, ready_timeout: float = 120.0
                   ) -> Iterator[tuple[str, subprocess.Popen]]:
    """`switchboard serve` on a free loopback port with its log in `data_dir/server.log`; yields (url, process)."""
    port = free_port()
    cmd = [sys.executable, "-m", "switchboard.clients.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
           "--log-level", "warning", *(extra_args or [])]
    if model_dir is not None:
        cmd += ["--model", str(model_dir)]
    url = f"http://127.0.0.1:{port}"
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    with running_process(cmd, url, Path(data_dir) / "server.log", env, ready_timeout) as (proc, _):
        yield url, proc
