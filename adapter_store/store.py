"""The store every backend implements, and how `--store` picks one.

A store keeps immutable, content-addressed task versions (blob + record), which version of each
(tenant, task) is current, tenants and API keys. Backends: the embedded SQLite store in the data
directory (the default; one process) and a shared PostgreSQL store (`postgresql://…`; many replicas,
each told of the others' changes through `watch`). `tests/test_store_conformance.py` runs one suite
over both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from switchboard.adapter_store.records import KeyRecord, StoreChange, TaskKey, TenantRecord, VersionRecord


class Store(Protocol):
    url: str  # for logs: "sqlite" or the PostgreSQL URL without its password

    def watch(self, on_change: Callable[[StoreChange], None]) -> None:
        """Call `on_change` (from a store thread) for every change another process makes."""

    def healthy(self) -> bool:
        """False while the store cannot be reached (writes fail; what is held keeps serving)."""

    def close(self) -> None: ...

    # versions
    def add_version(self, tenant: str, task: str, sha256: str, kind: str, labels: list[str], params: int,
                    nbytes: int, blob: bytes) -> VersionRecord:
        """Durably store blob and record and make the version current; numbers never repeat per task."""

    def set_current(self, tenant: str, task: str, version: int) -> None: ...

    def delete(self, tenant: str, task: str) -> None:
        """The task's versions go; its number sequence stays, so version numbers never repeat."""

    def task(self, tenant: str, task: str) -> tuple[int | None, list[VersionRecord]]: ...

    def load_all(self) -> tuple[dict[TaskKey, int], dict[TaskKey, list[VersionRecord]]]: ...

    # blobs
    def read_blob(self, sha256: str) -> bytes: ...

    def release_blob(self, sha256: str) -> bool:
        """Remove a blob no version of any tenant refers to; True if it went."""

    # tenants and keys
    def put_tenant(self, record: TenantRecord) -> TenantRecord: ...

    def tenants(self) -> list[TenantRecord]: ...

    def add_key(self, record: KeyRecord) -> KeyRecord: ...

    def revoke_key(self, key_id: str, at: float) -> bool: ...

    def api_keys(self) -> list[KeyRecord]: ...


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}"


def open_store(url: str | None, data_dir: Path, connect_timeout_s: float = 20.0) -> Store:
    """None or "sqlite" → the embedded store in `data_dir`; `postgresql://…` → the shared store (blobs
    cached under `data_dir`), waited for up to `connect_timeout_s` at start (it may still be starting)."""
    if not url or url == "sqlite":
        from switchboard.adapter_store.sqlite_store import SQLiteStore

        return SQLiteStore(data_dir)
    if url.startswith(("postgresql://", "postgres://")):
        from switchboard.adapter_store.postgres_store import PostgresStore

        return PostgresStore(url, data_dir, connect_timeout_s=connect_timeout_s)
    raise ValueError(f"--store must be a postgresql:// URL or absent (the embedded SQLite store), not {redact(url)!r}")
