"""What every route depends on: the app state, the runtime once ready, the settings, task names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Path, Request

from switchboard.server.errors import NotReady
from switchboard.server.http.schemas import TASK_NAME, ErrorResponse
from switchboard.server.metrics import Metrics
from switchboard.server.runtime.builder import Runtime
from switchboard.server.settings import Settings

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 422, 429, 503, 507)}


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    runtime: Runtime | None = None
    startup_error: str | None = None


# The dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency in
# its thread pool, and four thread hops per request cost more CPU than the whole classify handler.


async def get_state(request: Request) -> AppState:
    return request.app.state.switchboard


async def get_settings(state: Annotated[AppState, Depends(get_state)]) -> Settings:
    return state.settings


async def get_runtime(state: Annotated[AppState, Depends(get_state)]) -> Runtime:
    if state.runtime is None or not state.runtime.ready:
        raise NotReady(state.startup_error or "the backbone is still loading", {"Retry-After": "1"})
    return state.runtime


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
TaskName = Annotated[str, Path(pattern=TASK_NAME, description="task name", examples=["sentiment"])]
