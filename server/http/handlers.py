"""Exception → `{"error": {"type", "message"}}` with a fitting status, counted by type."""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from switchboard.adapter_store.records import StoreUnavailable
from switchboard.server.core.tokenize import InvalidText
from switchboard.server.errors import ApiError
from switchboard.server.http.schemas import unknown_fields_message
from switchboard.server.metrics import Metrics


def error_body(type_: str, message: str) -> bytes:
    """The one error shape. A message may quote client text holding a lone surrogate, which UTF-8 cannot
    encode: escaped (`\\ud800`) so the answer stays the 4xx it is instead of a 500 while rendering it."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return orjson.dumps({"error": {"type": type_, "message": message}})


def api_error_renderer(metrics: Metrics) -> Callable[[ApiError], tuple[int, dict[str, str], bytes]]:
    """(status, headers, body) for an ApiError, counted by type: what the fast path sends."""

    def render(exc: ApiError) -> tuple[int, dict[str, str], bytes]:
        metrics.failures.labels(exc.type).inc()
        return exc.status, dict(exc.headers), error_body(exc.type, exc.message)

    return render


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Unhandled exceptions are the outermost middleware's job (logged with the request id)."""

    def error(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> Response:
        metrics.failures.labels(type_).inc()
        return Response(error_body(type_, message), status_code=status, headers=headers,
                        media_type="application/json")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return error(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, exc: StoreUnavailable) -> Response:
        return error(503, "store_unavailable", str(exc), {"Retry-After": "1"})

    @app.exception_handler(InvalidText)
    async def invalid_text(request: Request, exc: InvalidText) -> Response:
        """Text that reached the tokenizer unchecked by a schema (e.g. an upload's canary): still a 422."""
        return error(422, "validation_error", str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        status, type_, message = explain(request, exc.errors(), getattr(exc, "body", None))
        return error(status, type_, message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code,
                                                                                           "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette names only the first matching route's methods
            headers["Allow"] = ", ".join(allowed_methods(request))
        message = str(exc.detail)
        if exc.status_code == 404 and exc.detail == "Not Found":  # no route matched
            message = (f"no route {request.method} {request.url.path[:200]!r}; the API's routes are listed at /docs "
                       "(and /openapi.json)")
        return error(exc.status_code, kind, message, headers or None)


def explain(request: Request, errors: Sequence[Any], body: object) -> tuple[int, str, str]:
    """(status, type, message) for a body FastAPI could not validate: what is wrong and how to fix it."""
    errors = list(errors)
    bounded = next((e for e in errors if e.get("type") == "unknown_field"), None)
    if bounded is not None:  # StrictModel refused an object with too many keys, naming its first unknown ones
        ctx, where = bounded.get("ctx") or {}, _where(bounded.get("loc", ()))
        return 422, "unknown_field", (f"{bounded['msg']}: "
                                      + unknown_fields_message(ctx.get("first", []), ctx.get("total", 0),
                                                               ctx.get("known", []), where))
    unknown = [e["loc"] for e in errors if e.get("type") == "extra_forbidden"]
    if unknown:  # (at most MAX_OBJECT_FIELDS per object: StrictModel refuses larger ones whole)
        parent = tuple(unknown[0][:-1])
        names = [str(loc[-1]) for loc in unknown if tuple(loc[:-1]) == parent]
        known = _fields_at(_body_model(request), parent)
        message = unknown_fields_message(names, len(names), known, _where(parent))
        others = len(unknown) - len(names)
        return 422, "unknown_field", message + (f" ({others} more unknown elsewhere)" if others else "")
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
    if first.get("type") == "string_unicode":  # pydantic's check of a constrained str (e.g. a training text)
        where = _where([x for x in first.get("loc", ()) if x not in ("str", "list[str]")])
        return 422, "validation_error", (f"{where or 'a field name'} is not valid Unicode text: it holds a lone "
                                         "surrogate")
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if where and message.startswith(where.split(".")[0]):  # the validator named the field already
        return 422, "validation_error", message
    return 422, "validation_error", f"{where}: {message}".strip(": ")


def _where(loc: Sequence[Any]) -> str:
    """A location as a client writes it: ("body", "examples", 3) → "examples[3]"; "" for the body."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _body_model(request: Request) -> Any:
    """The matched route's body model."""
    route = request.scope.get("route")
    field = getattr(route, "body_field", None)
    return getattr(getattr(field, "field_info", None), "annotation", None)


def _fields_at(model: Any, loc: Sequence[Any]) -> list[str]:
    """The field names of the model found at `loc` inside `model` (through lists and optionals)."""
    for part in loc:
        if part == "body" or isinstance(part, int):
            continue
        field = (getattr(model, "model_fields", None) or {}).get(part)
        model = _inner_model(field.annotation) if field is not None else None
    fields = getattr(model, "model_fields", None)
    return list(fields) if fields else []


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    return next((m for m in map(_inner_model, typing.get_args(annotation)) if m is not None), None)


METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route fully matches at this path (asked through the public `matches`)."""
    return [m for m in METHODS if any(route.matches({**request.scope, "method": m})[0] == Match.FULL
                                      for route in request.app.router.routes)]
