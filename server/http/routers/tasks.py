"""Tasks of the caller's tenant: upload a version, list, read, roll back, delete."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile

from switchboard.adapter_store.limits import UploadLimits, check_labels
from switchboard.adapter_store.records import VersionRecord
from switchboard.adapter_store.upload import parse_upload
from switchboard.server.core.adapter import AdapterValidationError
from switchboard.server.core.engine import CapacityError
from switchboard.server.errors import InsufficientCapacity, InvalidAdapter, InvalidRequest
from switchboard.server.http.audit import audited
from switchboard.server.http.auth import ManageAuth
from switchboard.server.http.deps import ERRORS, RuntimeDep, SettingsDep, TaskName
from switchboard.server.http.schemas import TASK_NAME, RollbackRequest, TaskList, TaskSummary, TaskVersionSummary
from switchboard.server.runtime.registry import TaskView

router = APIRouter(tags=["tasks"])


def _version(record: VersionRecord) -> TaskVersionSummary:
    return TaskVersionSummary(**record.summary())


def _task(view: TaskView) -> TaskSummary:
    return TaskSummary(**view.current.summary(), created_at=view.current.created_at,
                       versions=[_version(v) for v in view.versions])


@router.put("/v1/tasks/{task}", status_code=201, response_model=TaskVersionSummary, responses=ERRORS)
async def put_task(task: TaskName, request: Request, runtime: RuntimeDep, principal: ManageAuth,
                   files: Annotated[list[UploadFile], File(description="files of a saved adapter directory")],
                   labels: Annotated[str | None, Form(description="JSON array of label names")] = None,
                   ) -> TaskVersionSummary:
    """Upload a PEFT, AdapterHub or native adapter as the task's next version; it serves at once.
    Refused with 507 before anything is written if it could never fit the slot budget or the tenant's
    storage quota."""
    with audited(request, principal) as made:
        limits = runtime.upload_limits
        if len(files) > limits.max_files:
            raise InvalidAdapter(f"{len(files)} files; an adapter has at most {limits.max_files}")
        label_list = _parse_labels(labels, limits)
        contents: dict[str, bytes] = {}
        for f in files:
            name = f.filename or ""
            if name in contents:
                raise InvalidAdapter(f"file {name[:80]!r} uploaded twice")
            contents[name] = await f.read()
        spec, quota = runtime.engine.spec, runtime.tenancy.quotas(principal.tenant).storage

        def parse_and_store() -> VersionRecord:
            adapter = parse_upload(contents, spec, label_list, limits)
            return runtime.registry.put((principal.tenant, task), adapter, spec.fingerprint, quota)

        try:
            record = await runtime.upload_pool.run(parse_and_store)
        except AdapterValidationError as exc:
            raise InvalidAdapter(str(exc)) from exc
        except CapacityError as exc:
            raise InsufficientCapacity(str(exc)) from exc
        made["version"] = record.version
        return _version(record)


@router.get("/v1/tasks", response_model=TaskList, responses=ERRORS)
def list_tasks(runtime: RuntimeDep, settings: SettingsDep, principal: ManageAuth,
               limit: Annotated[int, Query(ge=1, le=100_000, description="tasks per page (max_list_page)")] = 100,
               after: Annotated[str | None, Query(pattern=TASK_NAME, description="the last task of the "
                                                                                "previous page")] = None,
               ) -> TaskList:
    """The current version of each of the caller's tasks, by name, a page at a time (`versions`:
    GET /v1/tasks/{task})."""
    limit = min(limit, settings.max_list_page)
    views = runtime.registry.page(principal.tenant, after, limit + 1)
    more = len(views) > limit
    return TaskList(tasks=[_version(view.current) for view in views[:limit]],
                    next=views[limit - 1].current.task if more else None)


@router.get("/v1/tasks/{task}", response_model=TaskSummary, responses=ERRORS)
def get_task(task: TaskName, runtime: RuntimeDep, principal: ManageAuth) -> TaskSummary:
    return _task(runtime.registry.get((principal.tenant, task)))


@router.post("/v1/tasks/{task}/rollback", response_model=TaskVersionSummary, responses=ERRORS)
def rollback_task(task: TaskName, body: RollbackRequest, request: Request, runtime: RuntimeDep,
                  principal: ManageAuth) -> TaskVersionSummary:
    """Make an earlier version current again; requests already admitted finish on their version."""
    with audited(request, principal) as made:
        record = runtime.registry.rollback((principal.tenant, task), body.version)
        made["version"] = record.version
        return _version(record)


@router.delete("/v1/tasks/{task}", status_code=204, response_class=Response, responses=ERRORS)
def delete_task(task: TaskName, request: Request, runtime: RuntimeDep, principal: ManageAuth) -> Response:
    with audited(request, principal):
        runtime.registry.delete((principal.tenant, task))
        return Response(status_code=204)


def _parse_labels(labels: str | None, limits: UploadLimits) -> list[str] | None:
    if labels is None or labels == "":
        return None
    try:
        value = json.loads(labels)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest("labels must be a JSON array of strings") from exc
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise InvalidRequest("labels must be a JSON array of non-empty strings")
    try:
        return check_labels(value, limits)
    except AdapterValidationError as exc:
        raise InvalidRequest(str(exc)) from exc
