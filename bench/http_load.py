"""A minimal keep-alive HTTP/1.1 JSON client on asyncio streams, for load generation.

httpx costs ~6 ms of CPU per request here; on a 2-core machine shared with the server that steals a
quarter of a core from the system under test. This client does only what the benchmark needs.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit


class Connection:
    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.retry_after: float = 0.0  # of the last answer (a 429's Retry-After header), 0 if none

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def post_json(self, path: str, body: object) -> tuple[int, bytes]:
        payload = json.dumps(body).encode()
        task = body.get("task") if isinstance(body, dict) else None
        affinity = f"X-Switchboard-Task: {task}\r\n" if task else ""  # as the SDK sends it, for proxies
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n{affinity}{self.extra}\r\n").encode()
        for attempt in (0, 1):
            if self._writer is None:
                await self._connect()
            assert self._reader is not None and self._writer is not None
            try:
                self._writer.write(head + payload)
                await self._writer.drain()
                header = await self._reader.readuntil(b"\r\n\r\n")
                break
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt:
                    raise
        status = int(header[9:12])
        length = 0
        self.retry_after = 0.0
        for line in header.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
            elif line[:12].lower() == b"retry-after:":
                self.retry_after = float(line[12:])
        data = await self._reader.readexactly(length) if length else b""
        return status, data

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except ConnectionError:
                pass
        self._reader = self._writer = None


class ConnectionPool:
    def __init__(self, url: str, size: int, headers: dict[str, str] | None = None) -> None:
        self._idle: asyncio.LifoQueue[Connection] = asyncio.LifoQueue()
        for _ in range(size):
            self._idle.put_nowait(Connection(url, headers))
        self._all: list[Connection] = []

    async def post_json(self, path: str, body: object) -> tuple[int, bytes]:
        conn = await self._idle.get()
        try:
            return await conn.post_json(path, body)
        except Exception:
            await conn.close()
            raise
        finally:
            self._idle.put_nowait(conn)

    async def close(self) -> None:
        while not self._idle.empty():
            await self._idle.get_nowait().close()
