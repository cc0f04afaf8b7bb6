"""Exception → `{"error": {"type", "message"}}` with a fitting status, counted by type."""

from __future__ import annotations

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
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(422, "validation_error", f"{where}: {first.get('msg', 'invalid request')}".strip(": "))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code,
                                                                                           "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette names only the first matching route's methods
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error(exc.status_code, kind, str(exc.detail), headers or None)


METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route fully matches at this path (asked through the public `matches`)."""
    return [m for m in METHODS if any(route.matches({**request.scope, "method": m})[0] == Match.FULL
                                      for route in request.app.router.routes)]
