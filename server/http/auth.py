"""Who may call what: one dependency per scope, attached to every route of a router.

`classify`: POST /v1/classify, GET /v1/backbone. `manage`: everything on the caller's own tasks and
jobs. `admin`: keys and tenants. The admin key has every scope and acts for the tenant named by
`X-Switchboard-Tenant` (default: `default`). /health, /metrics and the OpenAPI documents need no key.
Denials of management actions are audited.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Header, Request

from switchboard.server.errors import ApiError, Forbidden
from switchboard.server.http.audit import audit
from switchboard.server.http.deps import ServingDep
from switchboard.server.runtime.tenancy import Principal


async def authenticate(request: Request, serving: ServingDep,
                 authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
                 x_switchboard_tenant: Annotated[str | None, Header(include_in_schema=False)] = None,
                 ) -> Principal:
    """The caller; already known when the throttle middleware authenticated this request (once per request)."""
    principal = getattr(request.state, "principal", None)
    if principal is None:
        principal = await serving.authenticate(authorization, x_switchboard_tenant)
        request.state.principal = principal
    return principal


def scope_denial(principal: Principal, scope: str, open_mode: bool) -> Forbidden | None:
    """Why `principal` may not act with `scope`, if it may not (the header gate and the routes ask this)."""
    if scope == "admin" and not principal.admin:
        if open_mode:
            return Forbidden("open mode has no keys or tenants: start the server with an admin key "
                             "(SWITCHBOARD_ADMIN_KEY)")
        return Forbidden("this needs the admin key")
    if scope != "admin" and scope not in principal.scopes:
        return Forbidden(f"this key lacks the {scope!r} scope")
    return None


def require(scope: str) -> Callable[..., Principal]:
    """A dependency that admits principals holding `scope` ("admin": the admin key only). Async although it
    never awaits: a key check is a hash and a dict lookup, cheaper than FastAPI's thread hop for a `def`."""

    async def check(request: Request, serving: ServingDep,
              authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
              x_switchboard_tenant: Annotated[str | None, Header(include_in_schema=False)] = None) -> Principal:
        try:
            principal = await authenticate(request, serving, authorization, x_switchboard_tenant)
            denial = scope_denial(principal, scope, serving.open_mode)
            if denial is not None:
                raise denial
        except ApiError as exc:
            if scope != "classify" and request.method not in ("GET", "HEAD"):
                audit(request, None, outcome=f"denied: {exc.type}")
            raise
        return principal

    check.__name__ = f"require_{scope}"
    return check


ClassifyAuth = Annotated[Principal, Depends(require("classify"))]
ManageAuth = Annotated[Principal, Depends(require("manage"))]
AdminAuth = Annotated[Principal, Depends(require("admin"))]
