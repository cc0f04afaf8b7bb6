"""Tasks: upload a version, list, read, roll back, delete."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile

from switchboard.adapter_store.store import VersionRecord
from switchboard.adapter_store.upload import parse_upload
from switchboard.server.core.adapter import AdapterValidationError
from switchboard.server.core.engine import CapacityError
from switchboard.server.errors import InsufficientCapacity, InvalidAdapter, InvalidRequest
from switchboard.server.http.deps import ERRORS, RuntimeDep, SettingsDep, TaskName
from switchboard.server.http.schemas import RollbackRequest, TaskList, TaskSummary, TaskVersionSummary
from switchboard.server.runtime.registry import TaskView

router = APIRouter(tags=["tasks"])


def _version(record: VersionRecord) -> TaskVersionSummary:
    return TaskVersionSummary(**record.summary())


def _task(view: TaskView) -> TaskSummary:
    return TaskSummary(**view.current.summary(), created_at=view.current.created_at,
                       versions=[_version(v) for v in view.versions])


@router.put("/v1/tasks/{task}", status_code=201, response_model=TaskVersionSummary, responses=ERRORS)
async def put_task(task: TaskName, runtime: RuntimeDep, settings: SettingsDep,
                   files: Annotated[list[UploadFile], File(description="files of a saved adapter directory")],
                   labels: Annotated[str | None, Form(description="JSON array of label names")] = None,
                   ) -> TaskVersionSummary:
    """Upload a PEFT, AdapterHub or native adapter as the task's next version; it serves at once."""
    label_list = _parse_labels(labels, settings.max_labels)
    contents: dict[str, bytes] = {}
    for f in files:
        name = f.filename or ""
        if name in contents:
            raise InvalidAdapter(f"file {name!r} uploaded twice")
        contents[name] = await f.read()
    spec = runtime.engine.spec

    def parse_and_store() -> VersionRecord:
        return runtime.registry.put(task, parse_upload(contents, spec, label_list), spec.fingerprint)

    try:
        record = await asyncio.to_thread(parse_and_store)
    except AdapterValidationError as exc:
        raise InvalidAdapter(str(exc)) from exc
    except CapacityError as exc:
        raise InsufficientCapacity(str(exc)) from exc
    return _version(record)


@router.get("/v1/tasks", response_model=TaskList, responses=ERRORS)
def list_tasks(runtime: RuntimeDep) -> TaskList:
    return TaskList(tasks=[_task(view) for view in runtime.registry.snapshot()])


@router.get("/v1/tasks/{task}", response_model=TaskSummary, responses=ERRORS)
def get_task(task: TaskName, runtime: RuntimeDep) -> TaskSummary:
    return _task(runtime.registry.get(task))


@router.post("/v1/tasks/{task}/rollback", response_model=TaskVersionSummary, responses=ERRORS)
def rollback_task(task: TaskName, body: RollbackRequest, runtime: RuntimeDep) -> TaskVersionSummary:
    """Make an earlier version current again; requests already admitted finish on their version."""
    return _version(runtime.registry.rollback(task, body.version))


@router.delete("/v1/tasks/{task}", status_code=204, response_class=Response, responses=ERRORS)
def delete_task(task: TaskName, runtime: RuntimeDep) -> Response:
    runtime.registry.delete(task)
    return Response(status_code=204)


def _parse_labels(labels: str | None, max_labels: int) -> list[str] | None:
    if labels is None or labels == "":
        return None
    try:
        value = json.loads(labels)
    except json.JSONDecodeError as exc:
        raise InvalidRequest("labels must be a JSON array of strings") from exc
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise InvalidRequest("labels must be a JSON array of non-empty strings")
    if len(value) > max_labels:
        raise InvalidRequest(f"at most {max_labels} labels")
    return value
