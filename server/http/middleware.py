"""Pure ASGI middleware: request ids and unhandled errors, body size limits, per-request metrics
(bounded labels: route templates)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from switchboard.server.log_config import REQUEST_ID
from switchboard.server.metrics import Metrics

log = logging.getLogger(__name__)
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


async def _send_error(send: Send, status: int, type_: str, message: str,
                      extra_headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": {"type": type_, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    """Outermost: tags the request with an id (the client's `X-Request-Id` if it is a short plain token,
    else a new one), echoes it, and turns an unhandled exception into a logged traceback and a generic
    500 body that quotes the id — the exception text never reaches the client."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _CLIENT_REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        REQUEST_ID.set(request_id)
        started = False

        async def tagged_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, tagged_send)
        except Exception:
            log.exception("unhandled error on %s %s (request id %s)", scope.get("method"), scope.get("path"),
                          request_id)
            self.metrics.failures.labels("internal_error").inc()
            if not started:
                await _send_error(tagged_send, 500, "internal_error",
                                  f"internal server error; quote request id {request_id} when reporting it")


class ThrottleMiddleware:
    """The fast path of a refusal: a classify request of a tenant refused a moment ago is answered 429
    from its headers alone, before its body is read or parsed, so a flooding tenant costs the server
    little CPU (and others' forward passes stay fast)."""

    def __init__(self, app: ASGIApp, state: object, path: str = "/v1/classify") -> None:
        self.app = app
        self.state = state
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = getattr(self.state, "runtime", None)
        if scope["type"] == "http" and runtime is not None and scope["path"] == self.path and scope["method"] == "POST":
            headers = dict(scope.get("headers") or [])
            try:
                principal = runtime.tenancy.authenticate(headers.get(b"authorization", b"").decode("latin-1") or None,
                                                         headers.get(b"x-switchboard-tenant", b"").decode("latin-1")
                                                         or None)
            except Exception:  # noqa: BLE001 - the full path answers auth errors properly
                principal = None
            if principal is not None:
                scope.setdefault("state", {})["principal"] = principal  # the auth dependency reuses it
            retry = runtime.batcher.throttled(principal.tenant) if principal is not None else None
            if retry is not None:
                await _send_error(send, 429, "overloaded", f"this tenant is over its share now; retry in {retry} s",
                                  {"retry-after": str(retry)})
                return
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    """Raised while the app reads the body; FastAPI passes HTTPExceptions through to the 413 handler."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")


class BodyLimitMiddleware:
    """413 before reading a body whose Content-Length is too big; counts streamed bodies too.

    Uploads (PUT /v1/tasks/…) and training jobs (POST …/train) get their own, larger limits.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int, max_train_body_bytes: int,
                 task_prefix: str = "/v1/tasks/") -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.max_upload = max_upload_bytes
        self.max_train = max_train_body_bytes
        self.task_prefix = task_prefix

    def _limit(self, scope: Scope) -> int:
        path, method = scope["path"], scope["method"]
        if path.startswith(self.task_prefix):
            if method == "PUT":
                return self.max_upload
            if method == "POST" and path.endswith("/train"):
                return self.max_train
        return self.max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_error(send, 413, "payload_too_large", f"request body over {limit} bytes")
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _send_error(send, 413, "payload_too_large", f"request body over {limit} bytes")


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            endpoint = f"{scope['method']} {route.path}" if route is not None else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - start)
