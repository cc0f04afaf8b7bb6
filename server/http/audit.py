"""The audit trail: one JSON line per management action on the `switchboard.audit` logger.

Fields: time, tenant, key id (never a secret), action (method and route), task, version, outcome.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import Request

from switchboard.server.errors import ApiError
from switchboard.server.runtime.tenancy import Principal

log = logging.getLogger("switchboard.audit")


def audit(request: Request, principal: Principal | None, outcome: str, version: int | None = None,
          target: str | None = None, route_path: str | None = None, task: str | None = None) -> None:
    """route_path/task: given by the header gate, which answers before the router has matched."""
    principal = principal or getattr(request.state, "principal", None)
    route = request.scope.get("route")
    path = route_path or (route.path if route is not None else request.url.path[:200])
    entry = {
        "time": round(time.time(), 3),
        "tenant": principal.tenant if principal else None,
        "key_id": (principal.key_id or ("admin" if principal.admin else "open")) if principal else None,
        "action": f"{request.method} {path}",
        "task": task or request.path_params.get("task"),
        "target": target,
        "version": version,
        "outcome": outcome,
    }
    log.info(json.dumps(entry))


@contextmanager
def audited(request: Request, principal: Principal, target: str | None = None) -> Iterator[dict]:
    """Audit the enclosed management action: ok (with the version it made, if any), refused, or error."""
    made: dict = {"version": None}
    try:
        yield made
    except ApiError as exc:
        audit(request, principal, f"refused: {exc.type}", target=target)
        raise
    except Exception:
        audit(request, principal, "error", target=target)
        raise
    audit(request, principal, "ok", version=made["version"], target=target)
