"""The scheduler's side of `--fronts N`: the front link and the front processes.

The scheduler process binds the port once and is front 0; it spawns fronts 1 … N−1 (front.py), each
accepting on the same socket once it is connected to the scheduler. A front that dies is restarted at
once and the jobs it had sent are cancelled (its clients' connections died with it); the others go on.
Stopping sends SIGTERM to every front (each finishes its requests in flight, which still reach the
link) before the scheduler stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from switchboard.server.http.front import FrontConfig, listening_socket
from switchboard.server.metrics import Metrics
from switchboard.server.runtime.builder import EngineFactory
from switchboard.server.runtime.front_link import SchedulerEndpoint
from switchboard.server.runtime.serving import LocalServing
from switchboard.server.settings import Settings

log = logging.getLogger(__name__)


def default_fronts(cores: int | None = None) -> int:
    """One front per 4 cores, at most 8: on this project's 2-core CPU runs a second front cost more than it
    gave (docs/benchmarks.md, bench/front.py); on a GPU host the fronts feed one device."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(8, cores // 4))


def run_server(settings: Settings, log_config: dict | None = None,
               engine_factory: EngineFactory | None = None) -> str | None:
    """Serve until stopped (SIGINT/SIGTERM): one process, or front 0 + the scheduler here and
    `settings.fronts` − 1 front processes on the same socket. The start-up error, if loading failed
    (the server then stops at once instead of answering 503 forever)."""
    import uvicorn

    from switchboard.server.http.app import create_app
    from switchboard.server.http.edge import uvicorn_config

    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    count = settings.fronts or default_fronts()
    if count == 1:
        app = create_app(settings, on_startup_failure=stop, engine_factory=engine_factory)
        server = uvicorn.Server(uvicorn_config(app, settings, log_config))
        server.run()
    else:
        fronts = Fronts(settings, count, listening_socket(settings.host, settings.port), metrics=Metrics())
        app = create_app(settings, on_startup_failure=stop, engine_factory=engine_factory, fronts=fronts,
                         metrics=fronts.metrics)
        server = uvicorn.Server(uvicorn_config(app, settings, log_config))
        server.run(sockets=[fronts.listener, fronts.http_socket])
    return app.state.switchboard.startup_error


class Fronts:
    """Front processes 1 … count−1 around this (the scheduler's) process."""

    def __init__(self, settings: Settings, count: int, listener: socket.socket, metrics: Metrics) -> None:
        self.settings = settings
        self.count = count
        self.listener = listener
        self.metrics = metrics
        self._dir = tempfile.mkdtemp(prefix="switchboard-fronts-")  # 0700: only this user reaches the link
        self.link = f"ipc://{self._dir}/link"
        self.http_path = os.path.join(self._dir, "scheduler.sock")
        self.http_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.http_socket.bind(self.http_path)
        self.http_socket.listen(1024)
        self.endpoint: SchedulerEndpoint | None = None
        self._procs: dict[int, subprocess.Popen] = {}
        self._stopping = False
        self._lock = threading.Lock()
        self._parent_r, self._parent_w = os.pipe()  # the fronts watch the read end: EOF = we are gone
        os.set_inheritable(self._parent_r, True)

    @property
    def identities(self) -> list[bytes]:
        return [f"front-{i}".encode() for i in range(1, self.count)]

    def start(self, serving: Callable[[], LocalServing | None]) -> None:
        """Bind the link and spawn the fronts (on the event loop: the link answers there)."""
        loop = asyncio.get_running_loop()
        self.endpoint = SchedulerEndpoint(self.link, serving)
        self.endpoint.start()
        for index in range(1, self.count):
            self._spawn(index)
            threading.Thread(target=self._watch, args=(index, loop), name=f"switchboard-front-{index}",
                             daemon=True).start()
        self.metrics.fronts.set(self.count - 1)
        log.info("%d front processes besides this one accept on %s", self.count - 1, self.listener.getsockname())

    def _spawn(self, index: int) -> None:
        settings_json = self.settings.model_dump_json(exclude={"admin_key", "admin_key_file"})
        config = FrontConfig(index=index, listen_fd=self.listener.fileno(), parent_fd=self._parent_r,
                             link=self.link, scheduler_http=self.http_path, settings_json=settings_json)
        proc = subprocess.Popen([sys.executable, "-m", "switchboard.server.http.front", config.to_json()],
                                pass_fds=(self.listener.fileno(), self._parent_r), stdin=subprocess.DEVNULL)
        with self._lock:
            self._procs[index] = proc

    def _watch(self, index: int, loop: asyncio.AbstractEventLoop) -> None:
        """Restart front `index` whenever it dies, until stopping; its jobs in flight are cancelled."""
        while True:
            with self._lock:
                proc = self._procs[index]
            code = proc.wait()
            if self._stopping:
                return
            identity = f"front-{index}".encode()
            endpoint = self.endpoint
            if endpoint is not None:
                loop.call_soon_threadsafe(self._cancel_jobs, endpoint, identity, index, code)
            self.metrics.front_restarts.inc()
            time.sleep(0.5)  # a front that cannot start does not spin
            if self._stopping:
                return
            self._spawn(index)

    @staticmethod
    def _cancel_jobs(endpoint: SchedulerEndpoint, identity: bytes, index: int, code: int) -> None:
        cancelled = endpoint.front_gone(identity)
        log.error("front process %d died (exit code %s); %d of its requests cancelled; restarting it", index, code,
                  cancelled)

    def pids(self) -> dict[int, int]:
        with self._lock:
            return {i: p.pid for i, p in self._procs.items()}

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM every front and wait (they finish their requests in flight), then close the link."""
        self._stopping = True
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

        def wait_all() -> None:
            end = time.monotonic() + timeout_s
            for proc in procs:
                try:
                    proc.wait(max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

        await asyncio.to_thread(wait_all)
        self.metrics.fronts.set(0)
        if self.endpoint is not None:
            await self.endpoint.stop()
        os.close(self._parent_w)
        os.close(self._parent_r)
        self.http_socket.close()
        shutil.rmtree(self._dir, ignore_errors=True)
