"""What every route depends on: the app state, the runtime once ready, the settings, task names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Path, Request

from switchboard.server.errors import NotReady
from switchboard.server.http.schemas import TASK_NAME, ErrorResponse
from switchboard.server.metrics import Metrics
from switchboard.server.runtime.builder import Runtime
from switchboard.server.runtime.serving import LocalServing
from switchboard.server.settings import Settings

# Every error a /v1 route may answer, with the types behind each status (docs/limits.md, security.md).
ERROR_EXAMPLES: dict[int, dict[str, str]] = {
    400: {"bad_request": "the multipart body could not be parsed"},
    401: {"unauthorized": "missing API key: send Authorization: Bearer <key>"},
    403: {"forbidden": "this key lacks the 'manage' scope"},
    404: {"task_not_found": "unknown task 'sentiment'", "version_not_found": "task 'sentiment' has no version 9",
          "job_not_found": "unknown job '3f2c'", "key_not_found": "unknown key '9a1b'"},
    409: {"canary_failed": "the new version classified 2 of 3 canary texts as stated; version 1 stays current"},
    413: {"payload_too_large": "70 inputs; at most 64 per request"},
    415: {"unsupported_media_type": "send the body as JSON with the header Content-Type: application/json "
                                    "(got text/plain)"},
    422: {"unknown_field": "unknown field 'topk' (did you mean 'top_k'?); this endpoint takes: task, tasks, "
                           "inputs, raw_scores, top_k",
          "invalid_json": "the body is not valid JSON: Expecting value at line 1, column 9 (character 8)",
          "validation_error": "inputs: inputs is empty or only whitespace; send text to classify",
          "invalid_adapter": "tensor ia3.k_out has shape (5, 384); this backbone needs (6, 384)"},
    429: {"overloaded": "the queue would take 2.4 s to reach this request (limit 2 s); retry in 1 s"},
    503: {"not_ready": "the backbone is still loading", "deadline_exceeded": "request did not finish within 30.0 s",
          "engine_unavailable": "the engine worker died; retry the request",
          "store_unavailable": "the store cannot be reached"},
    507: {"insufficient_capacity": "the adapter needs 2 GiB resident, more than the slot budget",
          "quota_exceeded": "tenant 'acme' has 10000 tasks, its quota (max_tasks)"},
}
ERRORS = {code: {"model": ErrorResponse, "content": {"application/json": {"examples": {
    type_: {"summary": type_, "value": {"error": {"type": type_, "message": message}}}
    for type_, message in examples.items()}}}} for code, examples in ERROR_EXAMPLES.items()}


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    runtime: Runtime | None = None  # None in a front process: the runtime lives in the scheduler's
    serving: Any = None  # LocalServing, or front_link.RemoteServing in a front process; None while loading
    pipeline: Any = None  # pipeline.Pipeline over `serving`
    startup_error: str | None = None
    front_index: int = 0
    fronts: Any = None  # fronts.Fronts in the scheduler's process when it runs several


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


async def get_serving(state: Annotated[AppState, Depends(get_state)]) -> LocalServing:
    if state.serving is None:
        raise NotReady(state.startup_error or "the backbone is still loading", {"Retry-After": "1"})
    return state.serving


async def get_pipeline(state: Annotated[AppState, Depends(get_state)]) -> Any:
    if state.pipeline is None:
        raise NotReady(state.startup_error or "the backbone is still loading", {"Retry-After": "1"})
    return state.pipeline


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ServingDep = Annotated[LocalServing, Depends(get_serving)]  # or RemoteServing: the same calls
PipelineDep = Annotated[Any, Depends(get_pipeline)]
TaskName = Annotated[str, Path(pattern=TASK_NAME, description="task name", examples=["sentiment"])]
