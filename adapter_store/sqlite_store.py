"""The embedded store (the default): durable, immutable, content-addressed adapter versions under the data directory,
with tenants and API keys beside them.

Blobs (native safetensors) live in `blobs/<sha256>.safetensors`, written to a temp file, fsynced and
renamed; metadata lives in SQLite (WAL, synchronous=FULL). A version is acknowledged only after both
are durable, so a crash at any point leaves either the old state or the new one, never a version
without its blob. Orphan blobs (a crash between blob and commit) are removed on open. Blobs are shared
by content hash across tenants; one is removed only when no version of any tenant refers to it.

Schema versions (`PRAGMA user_version`): 0 = before tenants (tasks keyed by name alone); 2 = tasks
keyed by (tenant, task), plus tenants and keys. Opening an old data directory migrates it in one
transaction: its tasks belong to the tenant `default`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from switchboard.adapter_store.blob_files import BlobFiles
from switchboard.adapter_store.records import (
    DEFAULT_TENANT,
    KeyRecord,
    StoreChange,
    StoreInUseError,
    TaskKey,
    TenantRecord,
    VersionRecord,
)

log = logging.getLogger(__name__)
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    tenant TEXT NOT NULL, task TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL, kind TEXT NOT NULL,
    labels TEXT NOT NULL, params INTEGER NOT NULL, bytes INTEGER NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (tenant, task, version));
CREATE INDEX IF NOT EXISTS versions_sha256 ON versions (sha256);
CREATE TABLE IF NOT EXISTS tasks (
    tenant TEXT NOT NULL, task TEXT NOT NULL, current INTEGER, next_version INTEGER NOT NULL,
    PRIMARY KEY (tenant, task));
CREATE TABLE IF NOT EXISTS tenants (
    tenant TEXT PRIMARY KEY, created_at REAL NOT NULL, max_tasks INTEGER, max_adapter_bytes INTEGER,
    max_queued_rows INTEGER);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL, scopes TEXT NOT NULL, name TEXT,
    created_at REAL NOT NULL, expires_at REAL, revoked_at REAL);
"""
# Before tenants: the same tables without the tenant column.
MIGRATE_FROM_0 = f"""
ALTER TABLE versions RENAME TO versions_v0;
ALTER TABLE tasks RENAME TO tasks_v0;
{SCHEMA}
INSERT INTO versions SELECT '{DEFAULT_TENANT}', task, version, sha256, kind, labels, params, bytes, created_at
    FROM versions_v0;
INSERT INTO tasks SELECT '{DEFAULT_TENANT}', task, current, next_version FROM tasks_v0;
DROP TABLE versions_v0;
DROP TABLE tasks_v0;
"""


def _version(row: tuple) -> VersionRecord:
    return VersionRecord(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7], row[8])


def _key(row: tuple) -> KeyRecord:
    return KeyRecord(row[0], row[1], row[2], tuple(json.loads(row[3])), row[4], row[5], row[6], row[7])


class SQLiteStore:
    """One process per data directory; nothing else writes it, so `watch` has nothing to report."""

    url = "sqlite"

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobFiles(self.root / "blobs")
        # One process per data directory: a second one would remove the first one's in-flight blobs as
        # orphans and race its version numbers. The kernel drops the lock if the process dies.
        self._lock_file = open(self.root / "lock", "a+")  # noqa: SIM115 - held for the store's lifetime
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreInUseError(f"data directory {self.root} is in use by another Switchboard process "
                                  "(one process per data directory)") from None
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "switchboard.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._migrate()
        self._remove_orphans()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        legacy = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'versions'").fetchone()
        if version == SCHEMA_VERSION:
            return
        self._db.execute("BEGIN IMMEDIATE")  # one transaction (executescript would commit on its own)
        try:
            migrate = version == 0 and legacy and "tenant" not in {
                row[1] for row in self._db.execute("PRAGMA table_info(versions)")}
            for statement in (MIGRATE_FROM_0 if migrate else SCHEMA).split(";"):
                if statement.strip():
                    self._db.execute(statement)
            if migrate:
                log.info("migrated %s to tenants: its tasks belong to tenant %r", self.root, DEFAULT_TENANT)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._lock_file.close()

    def watch(self, on_change: Callable[[StoreChange], None]) -> None:
        """Changes made by other processes: there are none (the data directory is this process's)."""

    def healthy(self) -> bool:
        return True

    # ----- blobs -----------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.blobs.path(sha256)

    def read_blob(self, sha256: str) -> bytes:
        data = self.blobs.read(sha256)
        if data is None:
            raise FileNotFoundError(f"blob {sha256} is missing from {self.blobs.root}")
        return data

    def release_blob(self, sha256: str) -> bool:
        """Remove a blob no version of any tenant refers to any more; True if it went."""
        with self._lock:
            if self._db.execute("SELECT 1 FROM versions WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone():
                return False
            self.blobs.remove(sha256)
            return True

    def _remove_orphans(self) -> None:
        self.blobs.sweep(row[0] for row in self._db.execute("SELECT DISTINCT sha256 FROM versions"))

    # ----- versions --------------------------------------------------------------------------------
    def add_version(self, tenant: str, task: str, sha256: str, kind: str, labels: list[str], params: int,
                    nbytes: int, blob: bytes) -> VersionRecord:
        """Store the blob, then make a new version current, atomically: acknowledged = both durable."""
        with self._lock:
            self.blobs.write(sha256, blob)
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                row = cur.execute("SELECT next_version FROM tasks WHERE tenant = ? AND task = ?",
                                  (tenant, task)).fetchone()
                number = row[0] if row else 1
                record = VersionRecord(tenant, task, number, sha256, kind, list(labels), params, nbytes, time.time())
                cur.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (tenant, task, number, sha256, kind, json.dumps(labels), params, nbytes,
                             record.created_at))
                cur.execute("INSERT INTO tasks (tenant, task, current, next_version) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT(tenant, task) DO UPDATE SET current = excluded.current, "
                            "next_version = excluded.next_version", (tenant, task, number, number + 1))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            return record

    def set_current(self, tenant: str, task: str, version: int) -> None:
        with self._lock:
            self._db.execute("UPDATE tasks SET current = ? WHERE tenant = ? AND task = ?", (version, tenant, task))

    def delete(self, tenant: str, task: str) -> None:
        """The task disappears; its number sequence is kept so version numbers never repeat."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            cur.execute("UPDATE tasks SET current = NULL WHERE tenant = ? AND task = ?", (tenant, task))
            cur.execute("DELETE FROM versions WHERE tenant = ? AND task = ?", (tenant, task))
            cur.execute("COMMIT")

    def task(self, tenant: str, task: str) -> tuple[int | None, list[VersionRecord]]:
        """(current version or None if deleted/absent, its versions) of one task."""
        with self._lock:
            row = self._db.execute("SELECT current FROM tasks WHERE tenant = ? AND task = ?", (tenant, task)).fetchone()
            rows = self._db.execute("SELECT tenant, task, version, sha256, kind, labels, params, bytes, created_at "
                                    "FROM versions WHERE tenant = ? AND task = ? ORDER BY version", (tenant, task))
            return (row[0] if row else None), [_version(r) for r in rows]

    def load_all(self) -> tuple[dict[TaskKey, int], dict[TaskKey, list[VersionRecord]]]:
        """((tenant, task) → current version, (tenant, task) → its versions) for every live task."""
        with self._lock:
            current = {(tenant, task): cur for tenant, task, cur in
                       self._db.execute("SELECT tenant, task, current FROM tasks WHERE current IS NOT NULL")}
            versions: dict[TaskKey, list[VersionRecord]] = {}
            for row in self._db.execute("SELECT tenant, task, version, sha256, kind, labels, params, bytes, "
                                        "created_at FROM versions ORDER BY tenant, task, version"):
                if (row[0], row[1]) in current:
                    versions.setdefault((row[0], row[1]), []).append(_version(row))
            return current, versions

    # ----- tenants ---------------------------------------------------------------------------------
    def put_tenant(self, record: TenantRecord) -> TenantRecord:
        with self._lock:
            self._db.execute("INSERT INTO tenants VALUES (?, ?, ?, ?, ?) ON CONFLICT(tenant) DO UPDATE SET "
                             "max_tasks = excluded.max_tasks, max_adapter_bytes = excluded.max_adapter_bytes, "
                             "max_queued_rows = excluded.max_queued_rows",
                             (record.tenant, record.created_at, record.max_tasks, record.max_adapter_bytes,
                              record.max_queued_rows))
        return record

    def tenants(self) -> list[TenantRecord]:
        with self._lock:
            return [TenantRecord(*row) for row in self._db.execute(
                "SELECT tenant, created_at, max_tasks, max_adapter_bytes, max_queued_rows FROM tenants "
                "ORDER BY tenant")]

    # ----- keys ------------------------------------------------------------------------------------
    def add_key(self, record: KeyRecord) -> KeyRecord:
        with self._lock:
            self._db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (record.id, record.hash, record.tenant, json.dumps(list(record.scopes)), record.name,
                              record.created_at, record.expires_at, record.revoked_at))
        return record

    def revoke_key(self, key_id: str, at: float) -> bool:
        """False if there is no such live key."""
        with self._lock:
            cur = self._db.execute("UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (at, key_id))
            return cur.rowcount == 1

    def api_keys(self) -> list[KeyRecord]:
        with self._lock:
            return [_key(row) for row in self._db.execute(
                "SELECT id, hash, tenant, scopes, name, created_at, expires_at, revoked_at FROM keys "
                "ORDER BY created_at")]
