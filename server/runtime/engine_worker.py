"""An engine worker process: the frozen encoder and the slot pools, nothing else.

The front process (HTTP, tokenization, batching, the registry) talks to it over one Unix socket
(engine_protocol.py). The worker runs one operation at a time, in the order the front sent them, so
a load sent before a batch is always applied before that batch — the registry stays coherent without
acknowledgements. Only `forward` and `warm_up` are answered. A load that fails here (the front has
validated it already, so: out of memory, a bug) ends the worker: the front restarts it and replays
every resident task, rather than serving a worker whose slots differ from the front's books.

Why a process: inside the front process the forward pass shares the GIL and both cores with the
event loop and the tokenizer, and ran 25–35 % slower than alone (docs/benchmarks.md).

    python -m switchboard.server.runtime.engine_worker FD CONFIG_JSON
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from switchboard.adapter_store.formats import native
from switchboard.server.core import memory
from switchboard.server.core.backbone import load_backbone
from switchboard.server.core.engine import Engine
from switchboard.server.core.precision import Precision
from switchboard.server.log_config import configure_logging
from switchboard.server.runtime.engine_protocol import Message, WorkerGone, receive, send

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to build the same engine as its front process describes."""

    model: str
    max_length: int | None  # None: the model's own limit, as the front computes it
    precision: str
    device: str
    threads: int
    chunk_rows: int
    max_adapter_bytes: int
    index: int
    log_level: str = "info"
    log_format: str = "text"
    nice: int = 0  # added to the worker's niceness: the front's short bursts of work preempt its batches

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def build_engine(config: WorkerConfig) -> Engine:
    memory.limit_arenas(2)
    torch.set_num_threads(config.threads)
    backbone = load_backbone(config.model, max_length=config.max_length)
    return Engine(backbone, precision=Precision(config.precision), device=config.device,
                  max_adapter_bytes=config.max_adapter_bytes, chunk_rows=config.chunk_rows)


def handle(engine: Engine, message: Message, fingerprint: str) -> Message | None:
    """Run one operation; the answer to send back, if the operation has one."""
    op, f, a = message.op, message.fields, message.arrays
    if op == "forward":
        try:
            logits = engine.forward(torch.from_numpy(a["input_ids"]), torch.from_numpy(a["attention_mask"]),
                                    torch.from_numpy(a["task_slots"]))
        except (KeyError, ValueError, RuntimeError) as exc:  # a batch the engine refuses fails alone
            log.exception("worker forward failed")
            return Message("error", {"message": f"{type(exc).__name__}: {exc}"})
        return Message("result", arrays={"logits": logits.float().cpu().numpy()})
    if op == "load":
        task = int(f["task"])
        if engine.is_resident(task):  # a replay after a restart may repeat a load: same slot, same content
            engine.unload(task)
        engine.load(native.loads(a["blob"].tobytes(), fingerprint), task=task,
                    outside_budget=bool(f.get("outside_budget")))
        return None
    if op == "unload":
        if engine.is_resident(int(f["task"])):
            engine.unload(int(f["task"]))
        return None
    if op == "warm_up":
        tokens, seconds = engine.warm_up()
        return Message("result", {"tokens": tokens, "seconds": seconds})
    raise ValueError(f"unknown operation {op!r}")


def serve(sock: socket.socket, config: WorkerConfig) -> int:
    start = time.monotonic()
    engine = build_engine(config)
    # the front checks the fingerprint and length limit against its own backbone before it sends work
    send(sock, Message("ready", {"pid": os.getpid(), "seconds": time.monotonic() - start,
                                 "threads": torch.get_num_threads(), "device": str(engine.device),
                                 "fingerprint": engine.spec.fingerprint, "max_length": engine.spec.max_length}))
    while True:
        try:
            message = receive(sock)
        except WorkerGone:  # the front closed the socket: its way of stopping us
            return 0
        if message.op == "stop":
            return 0
        answer = handle(engine, message, engine.spec.fingerprint)
        if answer is not None:
            send(sock, answer)


def main(argv: list[str] | None = None) -> int:
    fd, config_json = (argv or sys.argv[1:])[:2]
    config = WorkerConfig(**json.loads(config_json))
    configure_logging(config.log_level, config.log_format)  # type: ignore[arg-type]
    if config.nice:
        os.nice(config.nice)
    sock = socket.socket(fileno=int(fd))
    try:
        return serve(sock, config)
    except WorkerGone:
        return 0
    except Exception:
        log.exception("engine worker %d failed; the front restarts it", config.index)
        return 1
    finally:
        sock.close()


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
