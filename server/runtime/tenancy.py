"""Tenants and API keys (DESIGN.md §9): who a request acts for, and what it may do.

Open mode (no admin key): every request acts for the tenant `default` with both scopes; there are no
keys. Auth mode: `Authorization: Bearer <key>` — the admin key (any tenant's tasks through
`X-Switchboard-Tenant`, plus keys and tenants) or a tenant key with scopes `classify` and/or `manage`.
Keys are 256-bit random secrets shown once; only their SHA-256 is kept, in memory for the per-request
check and in the store for restarts. Comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass

from switchboard.adapter_store.records import DEFAULT_TENANT, SCOPES, KeyRecord, TenantRecord
from switchboard.adapter_store.store import Store
from switchboard.server.errors import KeyNotFound, Unauthorized
from switchboard.server.runtime.registry import StorageQuota
from switchboard.server.settings import open_mode_refusal  # noqa: F401 - re-exported (tests, older imports)

log = logging.getLogger(__name__)
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KEY_PREFIX = "sb_"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a request acts for. Never holds a secret."""

    tenant: str
    scopes: frozenset[str]
    key_id: str | None  # None: the admin key, or open mode
    admin: bool = False


@dataclass(frozen=True)
class Quotas:
    max_tasks: int | None
    max_adapter_bytes: int | None
    max_queued_rows: int

    @property
    def storage(self) -> StorageQuota:
        return StorageQuota(self.max_tasks, self.max_adapter_bytes)


class Tenancy:
    def __init__(self, store: Store, admin_key: str | None, defaults: Quotas) -> None:
        self._store = store
        self._admin_digest = digest(admin_key) if admin_key else None
        self.defaults = defaults
        self._lock = threading.Lock()
        self._keys: dict[str, KeyRecord] = {}  # SHA-256 of the secret → record
        self._tenants: dict[str, TenantRecord] = {}
        self.reload()

    @property
    def open_mode(self) -> bool:
        return self._admin_digest is None

    def reload(self) -> None:
        """Keys and tenants from the store (start-up; replicas after a change elsewhere)."""
        keys = {k.hash: k for k in self._store.api_keys()}
        tenants = {t.tenant: t for t in self._store.tenants()}
        with self._lock:
            self._keys, self._tenants = keys, tenants

    # ----- who is asking ---------------------------------------------------------------------------
    def authenticate(self, authorization: str | None, tenant_header: str | None) -> Principal:
        if self.open_mode:
            return Principal(DEFAULT_TENANT, frozenset(SCOPES), None)
        scheme, _, secret = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthorized("missing API key: send Authorization: Bearer <key>")
        presented = digest(secret.strip())
        if hmac.compare_digest(presented, self._admin_digest or ""):
            tenant = tenant_header or DEFAULT_TENANT
            if not TENANT_NAME.match(tenant):
                raise Unauthorized("X-Switchboard-Tenant is not a valid tenant name")
            return Principal(tenant, frozenset(SCOPES), None, admin=True)
        with self._lock:
            record = self._keys.get(presented)
        if record is None or not hmac.compare_digest(record.hash, presented) or not record.valid(time.time()):
            raise Unauthorized("unknown, revoked or expired API key")
        return Principal(record.tenant, frozenset(record.scopes), record.id)

    # ----- keys ------------------------------------------------------------------------------------
    def create_key(self, tenant: str, scopes: list[str], name: str | None,
                   expires_at: float | None) -> tuple[KeyRecord, str]:
        """(record, secret): the secret exists only in this return value."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(id=secrets.token_hex(8), hash=digest(secret), tenant=tenant,
                           scopes=tuple(sorted(set(scopes))), name=name, created_at=time.time(),
                           expires_at=expires_at)
        self.ensure_tenant(tenant)
        self._store.add_key(record)
        with self._lock:
            self._keys[record.hash] = record
        return record, secret

    def api_keys(self) -> list[KeyRecord]:
        with self._lock:
            return sorted(self._keys.values(), key=lambda k: k.created_at)

    def revoke_key(self, key_id: str) -> KeyRecord:
        at = time.time()
        if not self._store.revoke_key(key_id, at):
            raise KeyNotFound(f"no live key {key_id[:64]!r}")
        with self._lock:
            record = next(k for k in self._keys.values() if k.id == key_id)
            revoked = KeyRecord(**{**record.__dict__, "revoked_at": at})
            self._keys[record.hash] = revoked
        return revoked

    # ----- tenants ---------------------------------------------------------------------------------
    def ensure_tenant(self, tenant: str) -> TenantRecord:
        with self._lock:
            existing = self._tenants.get(tenant)
        return existing or self.put_tenant(TenantRecord(tenant, time.time()))

    def put_tenant(self, record: TenantRecord) -> TenantRecord:
        with self._lock:
            existing = self._tenants.get(record.tenant)
        if existing is not None:
            record = TenantRecord(record.tenant, existing.created_at, record.max_tasks, record.max_adapter_bytes,
                                  record.max_queued_rows)
        self._store.put_tenant(record)
        with self._lock:
            self._tenants[record.tenant] = record
        return record

    def tenant(self, tenant: str) -> TenantRecord | None:
        with self._lock:
            return self._tenants.get(tenant)

    def tenant_names(self) -> list[str]:
        with self._lock:
            return sorted(self._tenants)

    def quotas(self, tenant: str) -> Quotas:
        """The tenant's overrides over the server's defaults."""
        record = self.tenant(tenant)
        d = self.defaults
        if record is None:
            return d
        return Quotas(record.max_tasks if record.max_tasks is not None else d.max_tasks,
                      record.max_adapter_bytes if record.max_adapter_bytes is not None else d.max_adapter_bytes,
                      record.max_queued_rows if record.max_queued_rows is not None else d.max_queued_rows)


