"""Tasks of the caller's tenant: upload a version, list, read, roll back, delete."""

from __future__ import annotations

import json
from typing import Annotated, BinaryIO

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile

from switchboard.adapter_store.limits import UploadLimits, check_labels, read_upload_file
from switchboard.adapter_store.records import VersionRecord
from switchboard.adapter_store.upload import parse_upload
from switchboard.server.core.adapter import AdapterValidationError, TaskAdapter
from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.core.engine import CapacityError
from switchboard.server.core.tokenize import check_text, tokenize
from switchboard.server.errors import (
    CanaryFailed,
    InsufficientCapacity,
    InvalidAdapter,
    InvalidRequest,
    PayloadTooLarge,
)
from switchboard.server.http.audit import audited
from switchboard.server.http.auth import ManageAuth
from switchboard.server.http.deps import ERRORS, RuntimeDep, SettingsDep, TaskName
from switchboard.server.http.schemas import TASK_NAME, RollbackRequest, TaskList, TaskSummary, TaskVersionSummary
from switchboard.server.runtime.builder import Runtime
from switchboard.server.runtime.registry import TaskView
from switchboard.server.settings import Settings

router = APIRouter(tags=["tasks"])


def _version(record: VersionRecord) -> TaskVersionSummary:
    return TaskVersionSummary(**record.summary())


def _task(view: TaskView) -> TaskSummary:
    return TaskSummary(**view.current.summary(), created_at=view.current.created_at,
                       versions=[_version(v) for v in view.versions])


@router.put("/v1/tasks/{task}", status_code=201, response_model=TaskVersionSummary, responses=ERRORS)
async def put_task(task: TaskName, request: Request, runtime: RuntimeDep, settings: SettingsDep,
                   principal: ManageAuth,
                   files: Annotated[list[UploadFile], File(description="files of a saved adapter directory")],
                   labels: Annotated[str | None, Form(description="JSON array of label names")] = None,
                   canary: Annotated[str | None, Form(description="JSON array of {\"text\", \"label\"}: the new "
                                                  "version becomes current only if it classifies every one as "
                                                  "stated, else 409 and nothing is stored (max_canary_texts)")] = None,
                   ) -> TaskVersionSummary:
    """Upload a PEFT, AdapterHub or native adapter as the task's next version; it serves at once.
    Refused with 507 before anything is written if it could never fit the slot budget or the tenant's
    storage quota; with a `canary`, refused with 409 if it misclassifies one of them."""
    with audited(request, principal) as made:
        limits = runtime.upload_limits
        if len(files) > limits.max_files:
            raise InvalidAdapter(f"{len(files)} files; an adapter has at most {limits.max_files}")
        label_list = _parse_labels(labels, limits)
        checks = _parse_canary(canary, settings)
        spooled: dict[str, BinaryIO] = {}
        for f in files:
            name = f.filename or ""
            if name in spooled:
                raise InvalidAdapter(f"file {name[:80]!r} uploaded twice")
            spooled[name] = f.file
        spec, quota = runtime.engine.spec, runtime.tenancy.quotas(principal.tenant).storage
        try:
            # read in the upload thread, one upload at a time, each file only once its header is checked:
            # the bytes in memory at once are one upload's, never every pending upload's
            adapter = await runtime.upload_pool.run(_read_and_parse, spooled, spec, label_list, limits)
            if checks:
                await _run_canary(runtime, settings, principal.tenant, adapter, checks)
            record = await runtime.upload_pool.run(runtime.registry.put, (principal.tenant, task), adapter,
                                                   spec.fingerprint, quota)
        except AdapterValidationError as exc:
            raise InvalidAdapter(str(exc)) from exc
        except CapacityError as exc:
            raise InsufficientCapacity(str(exc)) from exc
        made["version"] = record.version
        return _version(record)


def _read_and_parse(spooled: dict[str, BinaryIO], spec: BackboneSpec, labels: list[str] | None,
                    limits: UploadLimits) -> TaskAdapter:
    contents = {name: read_upload_file(name, file, limits) for name, file in spooled.items()}
    return parse_upload(contents, spec, labels, limits)


def _parse_canary(canary: str | None, settings: Settings) -> list[tuple[str, str]]:
    if canary is None or canary == "":
        return []
    try:
        value = json.loads(canary)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest('canary must be a JSON array of {"text": …, "label": …}') from exc
    if not isinstance(value, list) or not value or not all(
            isinstance(x, dict) and set(x) == {"text", "label"} and isinstance(x["text"], str)
            and isinstance(x["label"], str) and x["text"].strip() for x in value):
        raise InvalidRequest('canary must be a non-empty JSON array of {"text": …, "label": …} with non-empty texts')
    if len(value) > settings.max_canary_texts:
        raise PayloadTooLarge(f"{len(value)} canary texts; at most {settings.max_canary_texts} (max_canary_texts)")
    if any(len(x["text"]) > settings.max_input_chars for x in value):
        raise PayloadTooLarge(f"a canary text over {settings.max_input_chars} characters (max_input_chars)")
    check_text([x["text"] for x in value], "canary[{}].text")
    check_text([x["label"] for x in value], "canary[{}].label")
    return [(x["text"], x["label"]) for x in value]


async def _run_canary(runtime: Runtime, settings: Settings, tenant: str, adapter: TaskAdapter,
                      checks: list[tuple[str, str]]) -> None:
    """Classify the canary texts with the new version (loaded for the trial, not stored); CanaryFailed
    unless every one gets its stated label. Runs through the batcher like any request."""
    unknown = sorted({label for _, label in checks} - set(adapter.labels))
    if unknown:
        raise InvalidRequest(f"canary labels {unknown[:5]} are not labels of this adapter")
    texts = [text for text, _ in checks]
    ids, mask = tokenize(runtime.engine.backbone.tokenizer, texts, runtime.engine.spec.max_length)
    trial = runtime.registry.trial(adapter)
    lease = await runtime.upload_pool.run(trial.__enter__)
    try:
        item = runtime.batcher.submit(lease, ids, mask, settings.request_timeout_s, tenant=tenant,
                                      max_queued_rows=runtime.tenancy.quotas(tenant).max_queued_rows)
        logits = await runtime.batcher.result(item)
    finally:
        await runtime.upload_pool.run(trial.__exit__, None, None, None)
    predicted = [adapter.labels[i] for i in logits[:, : adapter.num_labels].argmax(-1).tolist()]
    wrong = [(text, label, got) for (text, label), got in zip(checks, predicted) if got != label]
    if wrong:
        shown = "; ".join(f"{text[:40]!r}: expected {label!r}, got {got!r}" for text, label, got in wrong[:3])
        raise CanaryFailed(f"the new version classified {len(checks) - len(wrong)} of {len(checks)} canary texts as "
                           f"stated ({shown}); nothing was stored and the current version stays")


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
    check_text(value, "labels")
    try:
        return check_labels(value, limits)
    except AdapterValidationError as exc:
        raise InvalidRequest(str(exc)) from exc
