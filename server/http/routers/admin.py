"""The admin's routes: API keys and tenants (the admin key only; audited)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from switchboard.adapter_store.records import KeyRecord, TenantRecord
from switchboard.server.errors import InvalidRequest, TenantNotFound
from switchboard.server.http.audit import audited
from switchboard.server.http.auth import AdminAuth
from switchboard.server.http.deps import ERRORS, RuntimeDep
from switchboard.server.http.schemas import (
    TASK_NAME,
    KeyCreate,
    KeyCreated,
    KeyInfo,
    KeyList,
    Residency,
    ResidentVersion,
    TenantInfo,
    TenantQuota,
    TenantUsage,
)

router = APIRouter(tags=["admin"])
KeyId = Annotated[str, Path(max_length=64, description="a key id, as returned by POST /v1/keys")]
TenantName = Annotated[str, Path(pattern=TASK_NAME, description="tenant name", examples=["acme"])]


def _time(at: float | None) -> datetime | None:
    return datetime.fromtimestamp(at, UTC) if at is not None else None


def _key(record: KeyRecord) -> dict:
    return {"id": record.id, "tenant": record.tenant, "scopes": list(record.scopes), "name": record.name,
            "created_at": _time(record.created_at), "expires_at": _time(record.expires_at)}


@router.post("/v1/keys", status_code=201, response_model=KeyCreated, responses=ERRORS)
def create_key(body: KeyCreate, request: Request, runtime: RuntimeDep, principal: AdminAuth) -> KeyCreated:
    """A new API key for a tenant (created if new). The secret is in this answer only."""
    with audited(request, principal, target=body.tenant):
        expires = body.expires_at.timestamp() if body.expires_at else None
        if expires is not None and body.expires_at.tzinfo is None:
            raise InvalidRequest("expires_at needs a time zone (RFC 3339, e.g. 2027-01-01T00:00:00Z)")
        if expires is not None and expires <= datetime.now(UTC).timestamp():
            raise InvalidRequest("expires_at is in the past")
        record, secret = runtime.tenancy.create_key(body.tenant, list(body.scopes), body.name, expires)
        return KeyCreated(**_key(record), key=secret)


@router.get("/v1/keys", response_model=KeyList, responses=ERRORS)
def list_keys(runtime: RuntimeDep, principal: AdminAuth) -> KeyList:
    """Every live key (revoked ones are gone), without secrets."""
    return KeyList(keys=[KeyInfo(**_key(k)) for k in runtime.tenancy.api_keys() if k.revoked_at is None])


@router.delete("/v1/keys/{key_id}", status_code=204, response_class=Response, responses=ERRORS)
def revoke_key(key_id: KeyId, request: Request, runtime: RuntimeDep, principal: AdminAuth) -> Response:
    """Refused from the next request on."""
    with audited(request, principal, target=key_id):
        runtime.tenancy.revoke_key(key_id)
        return Response(status_code=204)


def _tenant(runtime: RuntimeDep, tenant: str) -> TenantInfo:
    quotas = runtime.tenancy.quotas(tenant)
    usage = runtime.registry.usage(tenant)
    return TenantInfo(tenant=tenant, max_tasks=quotas.max_tasks, max_adapter_bytes=quotas.max_adapter_bytes,
                      max_queued_rows=quotas.max_queued_rows,
                      usage=TenantUsage(tasks=usage.tasks, adapter_bytes=usage.adapter_bytes,
                                        queued_rows=runtime.batcher.queued_rows(tenant)))


@router.put("/v1/tenants/{tenant}", response_model=TenantInfo, responses=ERRORS)
def put_tenant(tenant: TenantName, body: TenantQuota, request: Request, runtime: RuntimeDep,
               principal: AdminAuth) -> TenantInfo:
    """Create a tenant or set its quota overrides (null: the server's default)."""
    with audited(request, principal, target=tenant):
        runtime.tenancy.put_tenant(TenantRecord(tenant, datetime.now(UTC).timestamp(), body.max_tasks,
                                                body.max_adapter_bytes, body.max_queued_rows))
        return _tenant(runtime, tenant)


@router.get("/v1/tenants/{tenant}", response_model=TenantInfo, responses=ERRORS)
def get_tenant(tenant: TenantName, runtime: RuntimeDep, principal: AdminAuth) -> TenantInfo:
    """A tenant's quotas in effect and its usage."""
    if runtime.tenancy.tenant(tenant) is None:
        raise TenantNotFound(f"unknown tenant {tenant!r}")
    return _tenant(runtime, tenant)


@router.get("/v1/residency", response_model=Residency, responses=ERRORS)
def residency(runtime: RuntimeDep, principal: AdminAuth) -> Residency:
    """The task versions resident in this replica's device slots (admin only: it names every tenant's
    tasks). Routers may send a task where it is resident; the hash on `X-Switchboard-Task` does that
    without asking."""
    resident = [ResidentVersion(tenant=r.tenant, task=r.task, version=r.version, bytes=r.bytes, pins=pins,
                                resident_s=round(age, 3)) for r, pins, age in runtime.registry.residency()]
    return Residency(resident=resident, resident_bytes=runtime.engine.resident_bytes,
                     slot_budget_bytes=runtime.engine.max_adapter_bytes,
                     registered_tasks=runtime.registry.registered_tasks)
