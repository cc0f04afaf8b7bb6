"""The HTTP edge: limits that must bite while bytes arrive, before the app (or any parser) sees them.

uvicorn's httptools protocol has no bound on a request head's size (httptools builds a header value
by repeated concatenation: a 100 MiB header stalls the event loop for seconds), no timeout before
the first request or for a trickling head or body, and no cap on open connections. `EdgeProtocol`
adds each, with a setting: the head is counted as it is fed to the parser (431 past
`max_header_bytes`, 414 past `max_url_bytes`), a head must be complete within `header_timeout_s` of
its first byte (or of the connection, for the first request: 408), a body may pause at most
`body_idle_timeout_s` between chunks (408), and connections past `max_connections` are answered 503
and closed at once. Every refusal is counted in `switchboard_http_refused_total{reason}` and logged at
most once per `LOG_EVERY_S` per reason, with the count since the last line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from switchboard.server.metrics import Metrics
from switchboard.server.settings import Settings

log = logging.getLogger(__name__)
LOG_EVERY_S = 10.0
RESERVED_FDS = 256  # files the server itself needs beside its connections (store, engine sockets, logs)
REASONS = {408: "Request Timeout", 413: "Payload Too Large", 414: "URI Too Long",
           431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class RefusalLog:
    """Counts refusals per reason and logs each reason at most once per LOG_EVERY_S, so a flood of bad
    connections is visible to an operator without a log line per connection."""

    def __init__(self, metrics: Metrics | None) -> None:
        self._counter = metrics.http_refused if metrics is not None else None
        self._pending: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def __call__(self, reason: str, detail: str) -> None:
        if self._counter is not None:
            self._counter.labels(reason).inc()
        self._pending[reason] = self._pending.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._logged_at.get(reason, -LOG_EVERY_S) >= LOG_EVERY_S:
            count, self._pending[reason] = self._pending[reason], 0
            self._logged_at[reason] = now
            log.warning("refused %d connection(s) or request(s) in the last %.0f s: %s (%s)", count, LOG_EVERY_S,
                        reason, detail)


def _error_response(status: int, type_: str, message: str) -> bytes:
    body = json.dumps({"error": {"type": type_, "message": message}}).encode()
    return (f"HTTP/1.1 {status} {REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class _Refused(Exception):
    """Raised inside a parser callback: the head broke a limit; data_received answers it."""


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the edge's limits (the class attributes are set per server by
    `edge_protocol`)."""

    settings: Settings
    refusals: RefusalLog
    waiting: dict[EdgeProtocol, None]  # shared by one server's connections: those awaiting a request head

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # bytes fed now belong to a request head (request line + headers)
        self._head_bytes = 0
        self._refusal: tuple[int, str, str, str] | None = None  # (status, type, message, reason)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = ""  # "head" or "body"
        self._last_body_at = 0.0

    # ----- connections -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = self.settings.max_connections
        if len(self.connections) > limit:
            # make room by closing the connection that has waited longest without a complete request
            # head (never sent one, or trickling it): a flood of idle connections then cannot lock
            # out a client that sends its request at once
            victim = next(iter(self.waiting), None)
            if victim is not None:
                victim._waiting(False)
                self.refusals("evicted_idle", f"max_connections {limit} reached: closed the connection waiting "
                              "longest for a request head")
                victim._answer_and_close(408, "request_timeout", "closed to make room for a new connection: no "
                                         "complete request head was sent (max_connections)")
            else:
                self.refusals("too_many_connections", f"{len(self.connections) - 1} open, max_connections {limit}")
                self._answer_and_close(503, "too_many_connections", f"the server has {limit} connections busy "
                                       "(max_connections); retry shortly")
                return
        self._waiting(True)
        self._arm("head", self.settings.header_timeout_s)  # the first request's head: no idle connections

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._waiting(False)
        super().connection_lost(exc)

    def _waiting(self, waiting: bool) -> None:
        """Keep `waiting` (connections awaiting a complete request head, oldest first) up to date."""
        if waiting:
            self.waiting.setdefault(self, None)
        else:
            self.waiting.pop(self, None)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # idle on keep-alive: evictable, newest last
            self._waiting(False)
            self._waiting(True)

    def _answer_and_close(self, status: int, type_: str, message: str) -> None:
        """Answer with a JSON error and close; if the app already answered part of a response, just close."""
        self._disarm()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app sees http.disconnect; its own answer goes nowhere
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        if not self.transport.is_closing():
            self.transport.write(_error_response(status, type_, message))
            self.transport.close()

    # ----- timers --------------------------------------------------------------------------------------
    def _arm(self, kind: str, seconds: float) -> None:
        self._disarm()
        if seconds > 0:
            self._timer_kind = kind
            self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        s = self.settings
        if self._timer_kind == "body":
            idle = self.loop.time() - self._last_body_at
            if idle < s.body_idle_timeout_s:  # a chunk came since: wait for the rest of the window
                self._arm("body", s.body_idle_timeout_s - idle)
                return
            self.refusals("body_timeout", f"no body bytes for {s.body_idle_timeout_s:g} s (body_idle_timeout_s)")
            self._answer_and_close(408, "request_timeout", f"the request body stalled for {s.body_idle_timeout_s:g} "
                                   "s (body_idle_timeout_s); send it without pauses")
        else:
            self.refusals("header_timeout", f"no complete request head within {s.header_timeout_s:g} s "
                          "(header_timeout_s)")
            self._answer_and_close(408, "request_timeout", f"no complete request head within "
                                   f"{s.header_timeout_s:g} s (header_timeout_s)")

    # ----- bytes in ------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        """Feed the parser, but never more than `max_header_bytes` of one head: the rest of a chunk is
        fed only once the parser says the head ended inside what it was given."""
        self._unset_keepalive_if_required()
        limit = self.settings.max_header_bytes
        while data and not self.transport.is_closing():
            if self._in_head:
                room = limit - self._head_bytes
                if room <= 0:
                    self._refuse(431, "header_too_large", f"the request head (request line and headers) is over "
                                 f"{limit} bytes (max_header_bytes)", "header_too_large")
                    return
                part, data = data[:room], data[room:]
                self._head_bytes += len(part)
            else:
                part, data = data, b""
            if not self._feed(part):
                return

    def _feed(self, data: bytes) -> bool:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._refuse(*self._refusal)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return False
        return True

    def _refuse(self, status: int, type_: str, message: str, reason: str) -> None:
        self._refusal = None
        self.refusals(reason, message)
        self._answer_and_close(status, type_, message)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self not in self.waiting:  # a pipelined or keep-alive request: waiting again
            self._waiting(True)
        self._in_head = True
        if self._timer is None or self._timer_kind != "head":
            self._arm("head", self.settings.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        limit = self.settings.max_url_bytes
        if len(self.url) > limit:
            self._refusal = (414, "uri_too_long", f"the request target is over {limit} bytes (max_url_bytes)",
                             "url_too_long")
            raise _Refused

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._waiting(False)
        self._head_bytes = 0
        self._disarm()
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            self._last_body_at = self.loop.time()
            self._arm("body", self.settings.body_idle_timeout_s)

    def on_body(self, body: bytes) -> None:
        self._last_body_at = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._timer_kind == "body":
            self._disarm()
        self._in_head, self._head_bytes = True, 0  # what follows on this connection is the next head
        super().on_message_complete()


def edge_protocol(settings: Settings, metrics: Metrics | None) -> type[EdgeProtocol]:
    """EdgeProtocol bound to one server's settings and metrics (uvicorn builds one per connection)."""
    return type("SwitchboardEdgeProtocol", (EdgeProtocol,), {"settings": settings, "refusals": RefusalLog(metrics),
                                                             "waiting": {}})


def connection_limit(settings: Settings) -> int:
    """max_connections, lowered to what the process's open-file limit allows (with a warning): past
    that limit accept() fails and no client at all is served, and nothing says why."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    allowed = max(16, soft - RESERVED_FDS) if soft != resource.RLIM_INFINITY else settings.max_connections
    if settings.max_connections > allowed:
        log.warning("max_connections %d is more than the open-file limit allows (%d files, %d kept for the "
                    "server): serving at most %d connections; raise `ulimit -n` to allow more",
                    settings.max_connections, soft, RESERVED_FDS, allowed)
        return allowed
    return settings.max_connections


def uvicorn_config(app: Any, settings: Settings, log_config: dict | None = None, **overrides: Any) -> uvicorn.Config:
    """The one place the server's uvicorn options are chosen (serve and the in-thread test servers)."""
    metrics = getattr(getattr(getattr(app, "state", None), "switchboard", None), "metrics", None)
    bound = settings.model_copy(update={"max_connections": connection_limit(settings)})
    options: dict[str, Any] = dict(host=settings.host, port=settings.port, http=edge_protocol(bound, metrics),
                                   timeout_keep_alive=settings.keep_alive_timeout_s,
                                   timeout_graceful_shutdown=int(settings.request_timeout_s),
                                   server_header=False)
    if log_config is not None:
        options["log_config"] = log_config
    options.update(overrides)
    return uvicorn.Config(app, **options)
