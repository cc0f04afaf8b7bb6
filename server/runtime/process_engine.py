"""The engine as seen from the front process: books kept here, forward passes run in worker processes.

`ProcessEngine` offers what the registry and the batcher need from an engine (load, unload, forward,
the byte budget) while the encoder and the slot pools live in `workers` separate processes of
`threads` torch threads each (engine_worker.py). The front keeps the books — which task slot holds
which content, how many bytes are resident — so the registry's decisions never wait for a worker.
Every worker receives every load and unload, in order, on the same socket as its batches: a version
the registry has loaded is in every worker before any batch can name its slot.

A worker that dies (SIGKILL, out of memory) or stops answering within `timeout_s` fails the batch
it was running with a 503 and is restarted at once; its replacement is sent every resident task
again (re-read from the store by content hash) before it takes another batch.
"""

from __future__ import annotations

import logging
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from switchboard.adapter_store.formats import native
from switchboard.server.core.adapter import TaskAdapter
from switchboard.server.core.backbone import Backbone
from switchboard.server.core.books import SlotBooks
from switchboard.server.core.engine import ResidentTask, SlotBudget, plan_chunks, resident_nbytes
from switchboard.server.core.precision import Precision
from switchboard.server.errors import EngineUnavailable
from switchboard.server.metrics import Metrics
from switchboard.server.runtime.engine_protocol import Message, WorkerGone, receive, send
from switchboard.server.runtime.engine_worker import WorkerConfig

log = logging.getLogger(__name__)

BlobSource = Callable[[str], bytes]  # content hash → the native file (the store's read_blob)


class EngineWorker:
    """One worker process and its socket.

    Locks: `_call_lock` lets one forward at a time wait for its answer; `_send_lock` keeps frames
    from interleaving on the socket. Loads, unloads and the replay after a restart are sent with the
    engine's books lock held (taken before `_send_lock`), so a worker receives them in the order of
    the books; a forward takes `_send_lock` alone and never waits for another forward's answer."""

    def __init__(self, config: WorkerConfig, attach: Callable[[EngineWorker, socket.socket], None],
                 metrics: Metrics, start_timeout_s: float = 120.0) -> None:
        self.config = config
        self._attach = attach
        self._metrics = metrics
        self._start_timeout_s = start_timeout_s
        self._call_lock = threading.Lock()
        self.send_lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._pending: socket.socket | None = None  # a launched worker's socket, until it is ready
        self._expect: tuple[str, int] = ("", 0)
        self.sock: socket.socket | None = None  # None while not running: posts are skipped, the replay covers them

    @property
    def index(self) -> int:
        return self.config.index

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self.sock is not None and self._proc is not None and self._proc.poll() is None

    def launch(self) -> None:
        """Spawn the process without waiting for it (its start overlaps the front's own model load)."""
        self._kill()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [sys.executable, "-m", "switchboard.server.runtime.engine_worker", str(child.fileno()),
               self.config.to_json()]
        try:
            self._proc = subprocess.Popen(cmd, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            child.close()
        self._pending = parent

    def start(self, expect: tuple[str, int]) -> None:
        """Wait for a launched worker (launching it if needed) and attach it. expect: the front's
        (fingerprint, max_length); a worker that loaded anything else is refused."""
        self._expect = expect
        with self._call_lock:
            self._start_locked(launched=self._pending is not None)

    def _start_locked(self, launched: bool = False) -> None:
        """Spawn the process (unless launched), wait until its engine is built, then let the engine
        attach it (which replays every resident task). Runs with `_call_lock` held: no forward uses
        the old socket meanwhile."""
        if not launched:
            self.launch()
        parent, self._pending = self._pending, None
        assert parent is not None and self._proc is not None
        parent.settimeout(self._start_timeout_s)
        try:
            ready = receive(parent)
        except (WorkerGone, TimeoutError) as exc:
            self._proc.kill()
            code = self._proc.wait()
            parent.close()
            raise RuntimeError(f"engine worker {self.index} did not start (exit code {code}); see its log lines "
                               "above") from exc
        parent.settimeout(None)
        got = (ready.fields["fingerprint"], ready.fields["max_length"])
        if got != self._expect:
            self._proc.kill()
            self._proc.wait()
            parent.close()
            raise RuntimeError(f"engine worker {self.index} loaded backbone {got[0]} (max_length {got[1]}); the "
                               f"front serves {self._expect[0]} (max_length {self._expect[1]})")
        log.info("engine worker %d ready: pid %d, %d torch threads on %s, built in %.1f s", self.index,
                 ready.fields["pid"], ready.fields["threads"], ready.fields["device"], ready.fields["seconds"])
        self._attach(self, parent)

    def post(self, message: Message) -> None:
        """Send without waiting for an answer (call with the engine's books lock held). A worker that is
        not running is skipped: its restart replays the books, which already hold this change."""
        with self.send_lock:
            if self.sock is None:
                return
            try:
                send(self.sock, message)
            except WorkerGone:
                log.error("engine worker %d lost (its socket closed); it restarts before its next batch",
                          self.index)
                self._close_socket()

    def call(self, message: Message, timeout_s: float) -> Message:
        """Send and wait for the answer; a dead or hung worker raises EngineUnavailable (and is restarted)."""
        with self._call_lock:
            if not self.alive:
                log.warning("engine worker %d is not running; restarting it", self.index)
                self._metrics.engine_restarts.inc()
                self._start_locked()
            sock = self.sock
            assert sock is not None
            try:
                with self.send_lock:
                    send(sock, message)
                sock.settimeout(timeout_s)
                answer = receive(sock)
                sock.settimeout(None)
            except (WorkerGone, TimeoutError, OSError) as exc:
                reason = f"did not answer within {timeout_s:g} s" if isinstance(exc, TimeoutError) else "died"
                code = self._kill()
                log.error("engine worker %d %s during a %s (exit code %s); failing it with 503 and restarting",
                          self.index, reason, message.op, code)
                self._restart_in_background()
                raise EngineUnavailable(f"the engine worker {reason}; retry the request") from exc
        if answer.op == "error":
            raise RuntimeError(f"engine worker {self.index}: {answer.fields.get('message')}")
        return answer

    def _restart_in_background(self) -> None:
        def restart() -> None:
            try:
                with self._call_lock:
                    if not self.alive:
                        self._metrics.engine_restarts.inc()
                        self._start_locked()
            except Exception:
                log.exception("restarting engine worker %d failed; the next batch tries again", self.index)

        threading.Thread(target=restart, name=f"switchboard-engine-restart-{self.index}", daemon=True).start()

    def _close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _kill(self) -> int | None:
        with self.send_lock:
            self._close_socket()
        if self._pending is not None:
            self._pending.close()
            self._pending = None
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.kill()
        return self._proc.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._call_lock:
            with self.send_lock:
                if self.sock is not None:
                    try:
                        send(self.sock, Message("stop"))
                    except WorkerGone:
                        pass
                self._close_socket()
            if self._pending is not None:  # launched, never started
                self._pending.close()
                self._pending = None
            if self._proc is not None:
                try:
                    self._proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()


class ProcessEngine(SlotBudget):
    """Engine books in the front process, forward passes in worker processes."""

    def __init__(self, model_path: str, blob_source: BlobSource, metrics: Metrics, *,
                 max_length: int | None = None, precision: Precision | str = Precision.FP32,
                 device: torch.device | str = "cpu", max_adapter_bytes: int = 1 << 30, chunk_rows: int = 8,
                 workers: int = 1, threads: int = 2, timeout_s: float = 60.0, log_level: str = "info",
                 log_format: str = "text", nice: int = 0) -> None:
        """The books are usable once `start(backbone)` has run; `launch()` before it lets the workers load
        the model while the front loads its own copy."""
        self.precision = Precision(precision)
        self.dtype = self.precision.pool_dtype
        self.device = torch.device(device)
        self.books = SlotBooks(max_adapter_bytes)
        self.chunk_rows = chunk_rows
        self.timeout_s = timeout_s
        self._blob_source = blob_source
        self._metrics = metrics
        self._lock = threading.Lock()
        config = WorkerConfig(model=model_path, max_length=max_length, precision=str(self.precision),
                              device=str(self.device), threads=threads, chunk_rows=chunk_rows,
                              max_adapter_bytes=max_adapter_bytes, index=0, log_level=log_level, log_format=log_format,
                              nice=nice)
        self.workers = [EngineWorker(replace(config, index=i), self._attach, metrics) for i in range(workers)]
        self._idle: queue.SimpleQueue[EngineWorker] = queue.SimpleQueue()

    # ----- life cycle --------------------------------------------------------------------------------
    def launch(self) -> None:
        """Spawn every worker process now, without waiting for them."""
        for w in self.workers:
            w.launch()

    def start(self, backbone: Backbone) -> None:
        """Wait for every worker (launching those not launched) and check it loaded `backbone`, the
        front's: the same weights (fingerprint) and length limit."""
        self.backbone = backbone
        self.spec = backbone.spec
        self.pad_id = int(backbone.tokenizer.pad_token_id or 0)
        expect = (self.spec.fingerprint, self.spec.max_length)
        errors: list[BaseException] = []

        def start_one(worker: EngineWorker) -> None:
            try:
                worker.start(expect)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start_one, args=(w,)) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]
        for w in self.workers:
            self._idle.put(w)
        self._metrics.engine_workers.set(len(self.workers))

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self._metrics.engine_workers.set(0)

    @property
    def parallelism(self) -> int:
        """Batches that can run at once."""
        return len(self.workers)

    def _attach(self, worker: EngineWorker, sock: socket.socket) -> None:
        """Give a (re)started worker its socket and every resident task (re-read from the store by content
        hash), under the books lock: no load or unload can slip between the replay and the attach."""
        with self._lock:
            blobs = []
            for booked in self.books.by_slot():
                if booked.blob is not None:
                    blobs.append((booked, booked.blob))
                    continue
                try:
                    assert booked.sha256 is not None
                    blobs.append((booked, self._blob_source(booked.sha256)))
                except Exception:  # a deleted task's blob, between its delete and its unload: never used again
                    log.warning("task slot %d (%s) could not be replayed into worker %d: its blob is gone",
                                booked.slot, (booked.sha256 or "")[:12], worker.index)
            with worker.send_lock:
                worker.sock = sock
                for booked, blob in blobs:
                    send(sock, _load_message(booked.slot, blob, booked.outside_budget))
        if blobs:
            log.info("engine worker %d: %d resident tasks replayed", worker.index, len(blobs))

    # ----- books -------------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The front's copy of the backbone: what adapters' sizes and identity fills are computed from."""
        return self.backbone.model

    def load(self, adapter: TaskAdapter, sha256: str | None = None, outside_budget: bool = False,
             blob: bytes | None = None) -> ResidentTask:
        """Book a task slot and send the adapter to every worker. sha256: its content hash in the store,
        which a restarted worker is replayed from; without one (a built-in task) the blob is kept here.
        blob: the native file the adapter was parsed from (a cold load from the store), sent as it is —
        otherwise the adapter is serialised once here."""
        adapter.validate(self.spec)
        parts = self.components(adapter)
        nbytes = resident_nbytes(parts, self.dtype)
        if blob is None:
            blob = native.dumps(adapter, self.spec.fingerprint)
        with self._lock:
            task = self.books.book(nbytes, tuple(c.key for c in parts), outside_budget=outside_budget, sha256=sha256,
                                   blob=None if sha256 is not None else blob).slot
            message = _load_message(task, blob, outside_budget)
            for w in self.workers:  # under the books lock: workers see changes in the books' order
                w.post(message)
        return ResidentTask(slot=task, num_labels=adapter.num_labels, nbytes=nbytes,
                            temperature=adapter.head.temperature)

    def unload(self, task: int) -> None:
        with self._lock:
            self.books.release(task)
            message = Message("unload", {"task": task})
            for w in self.workers:
                w.post(message)

    # ----- forward -----------------------------------------------------------------------------------
    def chunks(self, attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        return plan_chunks(attention_mask, self.chunk_rows)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_slots: torch.Tensor) -> torch.Tensor:
        """Logits [B, C_max] from the next idle worker (blocking; one batch per worker at a time)."""
        worker = self._idle.get()
        try:
            answer = worker.call(Message("forward", arrays={
                "input_ids": _int64(input_ids), "attention_mask": _int64(attention_mask),
                "task_slots": _int64(task_slots)}), self.timeout_s)
        finally:
            self._idle.put(worker)
        return torch.from_numpy(answer.arrays["logits"])

    def warm_up(self) -> tuple[int, float]:
        """(tokens, seconds) of a dummy batch on one worker: seeds the admission's drain rate."""
        worker = self._idle.get()
        try:
            answer = worker.call(Message("warm_up"), self.timeout_s)
        finally:
            self._idle.put(worker)
        return int(answer.fields["tokens"]), float(answer.fields["seconds"])

    def worker_pids(self) -> list[int | None]:
        return [w.pid for w in self.workers]


def _load_message(task: int, blob: bytes, outside_budget: bool = False) -> Message:
    return Message("load", {"task": task, "outside_budget": outside_budget},
                   {"blob": np.frombuffer(blob, dtype=np.uint8)})


def _int64(t: torch.Tensor) -> np.ndarray:
    return t.to("cpu", torch.int64).numpy()

