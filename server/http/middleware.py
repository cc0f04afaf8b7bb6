"""Pure ASGI middleware: request ids and unhandled errors, the header gate (auth, scopes, throttle,
upload permits — before any body byte is read), body size limits, per-request metrics (bounded labels:
route templates and a fixed set of methods)."""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from switchboard.server.errors import ApiError
from switchboard.server.http.audit import audit
from switchboard.server.http.auth import scope_denial
from switchboard.server.log_config import REQUEST_ID
from switchboard.server.metrics import Metrics

log = logging.getLogger(__name__)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # metric label values
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


async def _send_error(send: Send, status: int, type_: str, message: str,
                      extra_headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": {"type": type_, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestIds:
    """A request's id: the client's `X-Request-Id` if it is a short plain token, else a new one — a random
    prefix per process and a counter (an os.urandom call per request cost more)."""

    def __init__(self) -> None:
        self._prefix, self._ids = uuid.uuid4().hex[:10], itertools.count()

    def of(self, headers: dict[bytes, bytes]) -> str:
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        return given if given and _CLIENT_REQUEST_ID.match(given) else f"{self._prefix}{next(self._ids):06x}"


class RequestIdMiddleware:
    """Outermost: tags the request with an id (the client's `X-Request-Id` if it is a short plain token,
    else a new one), echoes it, and turns an unhandled exception into a logged traceback and a generic
    500 body that quotes the id — the exception text never reaches the client."""

    def __init__(self, app: ASGIApp, metrics: Metrics, front: int | None = None) -> None:
        """front: this process's front index, sent as X-Switchboard-Front when the server runs several."""
        self.app = app
        self.metrics = metrics
        self._front = [(b"x-switchboard-front", str(front).encode())] if front is not None else []
        self._ids = RequestIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = self._ids.of(dict(scope.get("headers") or []))
        REQUEST_ID.set(request_id)
        started = False

        async def tagged_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode()), *self._front]}
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


# What a body-carrying request needs, decided from its method and path before a byte of its body is
# read; the routes' own dependencies check the same again (auth.py) for every request.
_CLASSIFY_PATHS = ("/v1/classify", "/v1/embed", "/v1/rerank")
_TASK_PATH = re.compile(r"^/v1/tasks/(?P<task>[^/]+)(?P<action>/train|/rollback)?$")


@dataclass(frozen=True)
class BodyRoute:
    scope: str  # classify, manage, admin
    template: str  # the route's path template, for the audit line
    task: str | None = None

    @property
    def is_upload(self) -> bool:
        return self.template == "/v1/tasks/{task}"


def body_route(method: str, path: str) -> BodyRoute | None:
    """What a POST/PUT/PATCH needs, or None for requests without a body the gate must guard."""
    if method not in ("POST", "PUT", "PATCH"):
        return None
    if path in _CLASSIFY_PATHS:
        return BodyRoute("classify", path)
    if (match := _TASK_PATH.match(path)) is not None:
        return BodyRoute("manage", "/v1/tasks/{task}" + (match["action"] or ""), match["task"][:200])
    if path == "/v1/keys":
        return BodyRoute("admin", path)
    if path.startswith("/v1/tenants/"):
        return BodyRoute("admin", "/v1/tenants/{tenant}")
    return None


class UploadPermits:
    """Uploads admitted at once, overall (`max_pending_uploads`) and per tenant (`tenant_max_pending_uploads`):
    a permit is taken from the headers, before the body is received, and held until the answer is sent, so
    the bodies spooled and parsed at once are bounded and no tenant takes every permit. Event loop only."""

    def __init__(self, total: int, per_tenant: int) -> None:
        self.total, self.per_tenant = total, per_tenant
        self._held: dict[str, int] = {}

    def refusal(self, tenant: str) -> str | None:
        held = sum(self._held.values())
        if held >= self.total:
            return f"{held} uploads are already being received or parsed (max_pending_uploads {self.total})"
        if self._held.get(tenant, 0) >= self.per_tenant:
            return (f"this tenant already has {self._held[tenant]} uploads being received or parsed "
                    f"(tenant_max_pending_uploads {self.per_tenant})")
        return None

    def take(self, tenant: str) -> None:
        self._held[tenant] = self._held.get(tenant, 0) + 1

    def give_back(self, tenant: str) -> None:
        self._held[tenant] -= 1
        if not self._held[tenant]:
            del self._held[tenant]


class GateMiddleware:
    """Everything a request's headers decide, answered before its body is read: who it is (401), whether
    its key may do this (403), whether its tenant was refused a moment ago (the classify fast path: 429
    for a tenant over its share, so a flood costs little CPU) and whether an upload may start now (429:
    `UploadPermits`). Unauthenticated bodies are never received, spooled or parsed."""

    def __init__(self, app: ASGIApp, state: object, metrics: Metrics, permits: UploadPermits) -> None:
        self.app = app
        self.state = state
        self.metrics = metrics
        self.permits = permits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        serving = getattr(self.state, "serving", None)
        path = scope.get("path", "")
        if scope["type"] != "http" or serving is None or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        route = body_route(scope["method"], path)
        if route is None:  # no body to guard: the route's own dependencies answer
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        try:
            principal = await serving.authenticate(
                headers.get(b"authorization", b"").decode("latin-1") or None,
                headers.get(b"x-switchboard-tenant", b"").decode("latin-1") or None)
            denial = scope_denial(principal, route.scope, serving.open_mode)
        except ApiError as exc:  # 401: nothing of the body is read
            principal, denial = None, exc
        if denial is not None:
            self.metrics.http_refused.labels(denial.type).inc()
            if route.scope != "classify":
                audit(Request(scope), principal, outcome=f"denied: {denial.type}", route_path=route.template,
                      task=route.task)
            await _send_error(send, denial.status, denial.type, denial.message, denial.headers)
            return
        assert principal is not None
        scope.setdefault("state", {})["principal"] = principal  # the auth dependency reuses it
        if route.scope == "classify":  # classify and embed
            retry = serving.throttled(principal.tenant)
            if retry is not None:
                await _send_error(send, 429, "overloaded", f"this tenant is over its share now; retry in {retry} s",
                                  {"retry-after": str(retry)})
                return
        if route.is_upload:
            refusal = self.permits.refusal(principal.tenant)
            if refusal is not None:
                self.metrics.http_refused.labels("uploads_pending").inc()
                await _send_error(send, 429, "overloaded", f"{refusal}; retry in a few seconds",
                                  {"retry-after": "2"})
                return
            self.permits.take(principal.tenant)
            try:
                await self.app(scope, receive, send)
            finally:
                self.permits.give_back(principal.tenant)
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
            method = scope["method"] if scope["method"] in METHODS else "OTHER"  # a client can send any token
            endpoint = f"{method} {route.path}" if route is not None else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - start)
