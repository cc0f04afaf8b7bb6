"""The shared store: PostgreSQL (psycopg 3, a connection pool) for records, blobs, tenants and keys,
so that several replicas serve one registry.

Guarantees, as the SQLite store's: a version is acknowledged only after its transaction (blob, record,
new current) committed; version numbers come from a row locked `FOR UPDATE`, so concurrent writers on
different replicas get distinct, increasing numbers; a blob shared by content hash is removed only
when no version refers to it, under a per-blob advisory lock that `add_version` takes too (so a
removal cannot race an upload of the same content).

Every write sends `NOTIFY switchboard, '<change>'` inside its transaction (delivered on commit). Each
replica LISTENs on its own connection and reports changes through `watch`; after a (re)connect it
reports `resync`, because notifications sent while it was away are lost. Blobs are cached per replica
under `<data dir>/blob-cache/` (content-addressed files), so a PostgreSQL outage does not stop loads of
blobs a replica has seen.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from switchboard.adapter_store.blob_files import BlobFiles
from switchboard.adapter_store.records import (
    KeyRecord,
    StoreChange,
    StoreUnavailable,
    TaskKey,
    TenantRecord,
    VersionRecord,
)
from switchboard.adapter_store.store import redact

log = logging.getLogger(__name__)
CHANNEL = "switchboard"
SCHEMA_LOCK = 0x5357_4244  # advisory lock id: one replica creates the schema at a time
SCHEMA = """
CREATE TABLE IF NOT EXISTS switchboard_versions (
    tenant TEXT NOT NULL, task TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL, kind TEXT NOT NULL,
    labels TEXT NOT NULL, params BIGINT NOT NULL, bytes BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (tenant, task, version));
CREATE INDEX IF NOT EXISTS switchboard_versions_sha256 ON switchboard_versions (sha256);
CREATE TABLE IF NOT EXISTS switchboard_tasks (
    tenant TEXT NOT NULL, task TEXT NOT NULL, current INTEGER, next_version INTEGER NOT NULL,
    PRIMARY KEY (tenant, task));
CREATE TABLE IF NOT EXISTS switchboard_blobs (sha256 TEXT PRIMARY KEY, data BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS switchboard_tenants (
    tenant TEXT PRIMARY KEY, created_at DOUBLE PRECISION NOT NULL, max_tasks BIGINT, max_adapter_bytes BIGINT,
    max_queued_rows BIGINT);
CREATE TABLE IF NOT EXISTS switchboard_keys (
    id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL, scopes TEXT NOT NULL, name TEXT,
    created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION, revoked_at DOUBLE PRECISION)
"""
VERSION_COLUMNS = "tenant, task, version, sha256, kind, labels, params, bytes, created_at"


def _version(row: tuple) -> VersionRecord:
    return VersionRecord(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7], row[8])


def _key(row: tuple) -> KeyRecord:
    return KeyRecord(row[0], row[1], row[2], tuple(json.loads(row[3])), row[4], row[5], row[6], row[7])


def _blob_lock(sha256: str) -> int:
    return int(sha256[:15], 16)  # 60 bits: a bigint advisory-lock id per blob


class PostgresStore:
    def __init__(self, url: str, data_dir: Path, pool_size: int = 4, timeout_s: float = 5.0,
                 connect_timeout_s: float = 20.0) -> None:
        self.url = redact(url)
        self._dsn = url
        self.cache = BlobFiles(Path(data_dir) / "blob-cache")
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._healthy = True
        self._listener: threading.Thread | None = None
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, timeout=timeout_s, open=False,
                                    kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout_s))},
                                    name="switchboard-store")
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except PoolTimeout as exc:
            self._pool.close()
            raise StoreUnavailable(f"cannot reach the PostgreSQL store at {self.url}") from exc
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for statement in SCHEMA.split(";"):
                conn.execute(statement)
        log.info("PostgreSQL store at %s", self.url)

    # ----- connections -------------------------------------------------------------------------------
    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        try:
            with self._pool.connection() as conn:
                yield conn
            self._healthy = True
        except (psycopg.OperationalError, PoolTimeout) as exc:
            self._healthy = False
            log.warning("PostgreSQL store at %s unavailable: %s", self.url, exc)
            raise StoreUnavailable(f"the store is unavailable now ({type(exc).__name__}); retry shortly") from exc

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        with self._connection() as conn, conn.transaction():
            yield conn

    @staticmethod
    def _notify(conn: psycopg.Connection, change: StoreChange) -> None:
        payload = json.dumps({"kind": change.kind, "tenant": change.tenant, "task": change.task})
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

    def healthy(self) -> bool:
        return self._healthy and (self._listener is None or self._listening.is_set())

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(5)
        self._pool.close()

    # ----- changes from other replicas ---------------------------------------------------------------
    def watch(self, on_change: Callable[[StoreChange], None]) -> None:
        self._listener = threading.Thread(target=self._listen, args=(on_change,), name="switchboard-store-listen",
                                          daemon=True)
        self._listener.start()

    def _listen(self, on_change: Callable[[StoreChange], None]) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=max(1, int(self._timeout_s))) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    self._healthy = True
                    backoff = 0.2
                    on_change(StoreChange("resync"))  # whatever was sent while nobody listened
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._deliver(on_change, note.payload)
                        conn.execute("SELECT 1")  # a dead connection raises here, not silently later
            except psycopg.Error as exc:
                if self._listening.is_set():
                    log.warning("lost the PostgreSQL store at %s (%s); serving what is held, reconnecting", self.url,
                                exc)
                self._listening.clear()
                self._healthy = False
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # noqa: BLE001 - a failing callback must not end the listener
                log.exception("applying a store change failed; resyncing")
                self._listening.clear()
                self._stop.wait(backoff)

    @staticmethod
    def _deliver(on_change: Callable[[StoreChange], None], payload: str) -> None:
        try:
            fields = json.loads(payload)
            change = StoreChange(fields["kind"], fields.get("tenant"), fields.get("task"))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed store notification")
            return
        on_change(change)

    # ----- blobs -------------------------------------------------------------------------------------
    def read_blob(self, sha256: str) -> bytes:
        data = self.cache.read(sha256)
        if data is not None:
            return data
        with self._connection() as conn:
            row = conn.execute("SELECT data FROM switchboard_blobs WHERE sha256 = %s", (sha256,)).fetchone()
        if row is None:
            raise FileNotFoundError(f"blob {sha256} is not in the store")
        data = bytes(row[0])
        self.cache.write(sha256, data)
        return data

    def release_blob(self, sha256: str) -> bool:
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_blob_lock(sha256),))
            if conn.execute("SELECT 1 FROM switchboard_versions WHERE sha256 = %s LIMIT 1", (sha256,)).fetchone():
                return False
            conn.execute("DELETE FROM switchboard_blobs WHERE sha256 = %s", (sha256,))
        self.cache.remove(sha256)
        return True

    # ----- versions ----------------------------------------------------------------------------------
    def add_version(self, tenant: str, task: str, sha256: str, kind: str, labels: list[str], params: int,
                    nbytes: int, blob: bytes) -> VersionRecord:
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_blob_lock(sha256),))
            conn.execute("INSERT INTO switchboard_blobs VALUES (%s, %s) ON CONFLICT DO NOTHING", (sha256, blob))
            conn.execute("INSERT INTO switchboard_tasks VALUES (%s, %s, NULL, 1) ON CONFLICT DO NOTHING",
                         (tenant, task))
            number = conn.execute("SELECT next_version FROM switchboard_tasks WHERE tenant = %s AND task = %s "
                                  "FOR UPDATE", (tenant, task)).fetchone()[0]
            record = VersionRecord(tenant, task, number, sha256, kind, list(labels), params, nbytes, time.time())
            conn.execute(f"INSERT INTO switchboard_versions ({VERSION_COLUMNS}) VALUES "
                         "(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                         (tenant, task, number, sha256, kind, json.dumps(labels), params, nbytes, record.created_at))
            conn.execute("UPDATE switchboard_tasks SET current = %s, next_version = %s WHERE tenant = %s AND task = %s",
                         (number, number + 1, tenant, task))
            self._notify(conn, StoreChange("task", tenant, task))
        self.cache.write(sha256, blob)
        return record

    def set_current(self, tenant: str, task: str, version: int) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE switchboard_tasks SET current = %s WHERE tenant = %s AND task = %s",
                         (version, tenant, task))
            self._notify(conn, StoreChange("task", tenant, task))

    def delete(self, tenant: str, task: str) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE switchboard_tasks SET current = NULL WHERE tenant = %s AND task = %s", (tenant, task))
            conn.execute("DELETE FROM switchboard_versions WHERE tenant = %s AND task = %s", (tenant, task))
            self._notify(conn, StoreChange("task", tenant, task))

    def task(self, tenant: str, task: str) -> tuple[int | None, list[VersionRecord]]:
        with self._transaction() as conn:  # one snapshot for both reads
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            row = conn.execute("SELECT current FROM switchboard_tasks WHERE tenant = %s AND task = %s",
                               (tenant, task)).fetchone()
            rows = conn.execute(f"SELECT {VERSION_COLUMNS} FROM switchboard_versions WHERE tenant = %s AND task = %s "
                                "ORDER BY version", (tenant, task)).fetchall()
        return (row[0] if row else None), [_version(r) for r in rows]

    def load_all(self) -> tuple[dict[TaskKey, int], dict[TaskKey, list[VersionRecord]]]:
        with self._transaction() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            current = {(t, n): c for t, n, c in conn.execute(
                "SELECT tenant, task, current FROM switchboard_tasks WHERE current IS NOT NULL")}
            versions: dict[TaskKey, list[VersionRecord]] = {}
            for row in conn.execute(f"SELECT {VERSION_COLUMNS} FROM switchboard_versions "
                                    "ORDER BY tenant, task, version"):
                if (row[0], row[1]) in current:
                    versions.setdefault((row[0], row[1]), []).append(_version(row))
        return current, versions

    def sweep_cache(self) -> int:
        """Drop cached blobs no version refers to any more (deleted on any replica)."""
        with self._connection() as conn:
            referenced = [row[0] for row in conn.execute("SELECT DISTINCT sha256 FROM switchboard_versions")]
        return self.cache.sweep(referenced)

    # ----- tenants -----------------------------------------------------------------------------------
    def put_tenant(self, record: TenantRecord) -> TenantRecord:
        with self._transaction() as conn:
            conn.execute("INSERT INTO switchboard_tenants VALUES (%s, %s, %s, %s, %s) ON CONFLICT (tenant) DO UPDATE "
                         "SET max_tasks = excluded.max_tasks, max_adapter_bytes = excluded.max_adapter_bytes, "
                         "max_queued_rows = excluded.max_queued_rows",
                         (record.tenant, record.created_at, record.max_tasks, record.max_adapter_bytes,
                          record.max_queued_rows))
            self._notify(conn, StoreChange("tenants", record.tenant))
        return record

    def tenants(self) -> list[TenantRecord]:
        with self._connection() as conn:
            return [TenantRecord(*row) for row in conn.execute(
                "SELECT tenant, created_at, max_tasks, max_adapter_bytes, max_queued_rows FROM switchboard_tenants "
                "ORDER BY tenant")]

    # ----- keys --------------------------------------------------------------------------------------
    def add_key(self, record: KeyRecord) -> KeyRecord:
        with self._transaction() as conn:
            conn.execute("INSERT INTO switchboard_keys VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                         (record.id, record.hash, record.tenant, json.dumps(list(record.scopes)), record.name,
                          record.created_at, record.expires_at, record.revoked_at))
            self._notify(conn, StoreChange("keys", record.tenant))
        return record

    def revoke_key(self, key_id: str, at: float) -> bool:
        with self._transaction() as conn:
            cur = conn.execute("UPDATE switchboard_keys SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL",
                               (at, key_id))
            if cur.rowcount == 1:
                self._notify(conn, StoreChange("keys"))
            return cur.rowcount == 1

    def api_keys(self) -> list[KeyRecord]:
        with self._connection() as conn:
            return [_key(row) for row in conn.execute(
                "SELECT id, hash, tenant, scopes, name, created_at, expires_at, revoked_at FROM switchboard_keys "
                "ORDER BY created_at")]
