"""Exception → `{"error": {"type", "message"}}` with a fitting status, counted by type."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from switchboard.adapter_store.records import StoreUnavailable
from switchboard.server.errors import ApiError
from switchboard.server.metrics import Metrics


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Unhandled exceptions are the outermost middleware's job (logged with the request id)."""

    def error(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.failures.labels(type_).inc()
        return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return error(503, "store_unavailable", str(exc), {"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, type_, message = explain(request, exc.errors(), getattr(exc, "body", None))
        return error(status, type_, message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code,
                                                                                           "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette names only the first matching route's methods
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error(exc.status_code, kind, str(exc.detail), headers or None)


def explain(request: Request, errors: Sequence[Any], body: object) -> tuple[int, str, str]:
    """(status, type, message) for a body FastAPI could not validate: what is wrong and how to fix it."""
    errors = list(errors)
    unknown = [str(e["loc"][-1]) for e in errors if e.get("type") == "extra_forbidden"]
    if unknown:
        known = _body_fields(request)
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return 422, "unknown_field", (f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                                      f"this endpoint takes: {', '.join(known)}")
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        position = first["loc"][-1] if isinstance(first["loc"][-1], int) else 0
        raw = body if isinstance(body, str | bytes) else ""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return 422, "invalid_json", (f"the body is not valid JSON: {reason} at line {line}, column {column} "
                                     f"(character {position})")
    content_type = request.headers.get("content-type", "")
    if first.get("loc") in (("body",), ["body"]) and "json" not in content_type:
        return 415, "unsupported_media_type", (f"send the body as JSON with the header Content-Type: application/json "
                                               f"(got {content_type or 'no Content-Type'})")
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return 422, "validation_error", f"{where}: {message}".strip(": ")


def _body_fields(request: Request) -> list[str]:
    """The JSON fields of the matched route's body model."""
    route = request.scope.get("route")
    field = getattr(route, "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    fields = getattr(model, "model_fields", None)
    return list(fields) if fields else []


METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route fully matches at this path (asked through the public `matches`)."""
    return [m for m in METHODS if any(route.matches({**request.scope, "method": m})[0] == Match.FULL
                                      for route in request.app.router.routes)]
