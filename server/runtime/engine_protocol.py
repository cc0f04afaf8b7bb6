"""Messages between the front process and its engine workers, over a Unix stream socket.

A frame is an 8-byte length, a JSON header and the raw bytes of its arrays:

    [u64 length of the rest][u32 header length][header JSON][array 0 bytes][array 1 bytes]…

The header holds the operation, its plain fields and each array's name, dtype and shape. Nothing is
pickled: both ends are ours, but a frame is still only JSON and numbers (a worker never runs what it
receives). Arrays are decoded with `numpy.frombuffer`, without a copy.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_LENGTH = struct.Struct("<Q")
_HEADER = struct.Struct("<I")
MAX_FRAME_BYTES = 1 << 31  # a batch or an adapter blob is far below this; more means a broken stream


class WorkerGone(ConnectionError):
    """The other end closed the socket (the worker died, or the front went away)."""


@dataclass
class Message:
    op: str  # load, unload, forward, warm_up, result, error, ready, stop
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def encode(message: Message) -> list[bytes | memoryview]:
    """The frame as buffers for `socket.sendmsg` (arrays are not copied)."""
    arrays = {name: np.ascontiguousarray(a) for name, a in message.arrays.items()}
    header = json.dumps({"op": message.op, "fields": message.fields,
                         "arrays": [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]}).encode()
    buffers: list[bytes | memoryview] = [_HEADER.pack(len(header)), header,
                                         *(memoryview(a).cast("B") for a in arrays.values() if a.nbytes)]
    size = sum(len(b) if isinstance(b, bytes) else b.nbytes for b in buffers)
    return [_LENGTH.pack(size), *buffers]


def decode(frame: bytes | bytearray | memoryview) -> Message:
    view = memoryview(frame)
    (header_len,) = _HEADER.unpack_from(view, 0)
    offset = _HEADER.size + header_len
    header = json.loads(bytes(view[_HEADER.size:offset]))
    arrays: dict[str, np.ndarray] = {}
    for name, dtype, shape in header["arrays"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.frombuffer(view, dtype=dt, count=count, offset=offset).reshape(shape)
        offset += count * dt.itemsize
    return Message(header["op"], header["fields"], arrays)


def send(sock: socket.socket, message: Message) -> None:
    buffers = encode(message)
    try:
        for buf in buffers:  # sendall per buffer: sendmsg may write only part of a large frame
            sock.sendall(buf)
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise WorkerGone(str(exc)) from exc


def _read_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got)
        except ConnectionResetError as exc:
            raise WorkerGone(str(exc)) from exc
        if k == 0:
            raise WorkerGone("the other end closed the connection")
        got += k
    return buf


def receive(sock: socket.socket) -> Message:
    """The next message; raises WorkerGone on EOF and TimeoutError past the socket's timeout."""
    (size,) = _LENGTH.unpack(_read_exact(sock, _LENGTH.size))
    if size > MAX_FRAME_BYTES:
        raise WorkerGone(f"frame of {size} bytes: the stream is broken")
    return decode(_read_exact(sock, size))
