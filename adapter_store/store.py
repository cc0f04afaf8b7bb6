"""Durable, immutable, content-addressed adapter versions under the data directory.

Blobs (native safetensors, whatever format was uploaded) live in `blobs/<sha256>.safetensors`, written to
a temp file, fsynced and renamed; metadata lives in SQLite (WAL, synchronous=FULL). A version is
acknowledged only after both are durable, so a crash at any point leaves either the old state or the
new one, never a version without its blob. Orphan blobs (a crash between blob and commit) are removed
on open.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    task TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL, kind TEXT NOT NULL,
    labels TEXT NOT NULL, params INTEGER NOT NULL, bytes INTEGER NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (task, version));
CREATE TABLE IF NOT EXISTS tasks (
    task TEXT PRIMARY KEY, current INTEGER, next_version INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class VersionRecord:
    """One acknowledged, immutable task version: the only declaration of it (the registry wraps it,
    the HTTP schemas derive from it)."""

    task: str
    version: int
    sha256: str
    kind: str
    labels: list[str]
    params: int
    bytes: int
    created_at: float

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    # what a client sees of a version (the API's version summary), in the contract's order
    SUMMARY_FIELDS: ClassVar[tuple[str, ...]] = ("task", "version", "kind", "num_labels", "labels", "params",
                                                 "bytes", "sha256")

    def summary(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.SUMMARY_FIELDS}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreInUseError(RuntimeError):
    """Another live process holds the data directory."""


class AdapterStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
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
        self._db.executescript(SCHEMA)
        self._remove_orphans()

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._lock_file.close()

    # ----- blobs -----------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        if not all(c in "0123456789abcdef" for c in sha256) or len(sha256) != 64:
            raise ValueError("not a sha256 hex digest")
        return self.blobs / f"{sha256}.safetensors"

    def write_blob(self, sha256: str, data: bytes) -> None:
        """Temp file → fsync → rename → fsync dir. Content-addressed: an existing blob is kept."""
        path = self.blob_path(sha256)
        if path.exists():
            return
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.blobs)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    def _remove_orphans(self) -> None:
        for tmp in self.blobs.glob(".tmp-*"):
            tmp.unlink(missing_ok=True)
        referenced = {row[0] for row in self._db.execute("SELECT DISTINCT sha256 FROM versions")}
        for blob in self.blobs.glob("*.safetensors"):
            if blob.stem not in referenced:
                blob.unlink(missing_ok=True)

    # ----- metadata --------------------------------------------------------------------------------
    def add_version(self, task: str, sha256: str, kind: str, labels: list[str], params: int,
                    nbytes: int) -> VersionRecord:
        """Make a new version current, atomically; the blob must already be written."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                row = cur.execute("SELECT next_version FROM tasks WHERE task = ?", (task,)).fetchone()
                number = row[0] if row else 1
                record = VersionRecord(task, number, sha256, kind, list(labels), params, nbytes, time.time())
                cur.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (task, number, sha256, kind, json.dumps(labels), params, nbytes, record.created_at))
                cur.execute("INSERT INTO tasks (task, current, next_version) VALUES (?, ?, ?) "
                            "ON CONFLICT(task) DO UPDATE SET current = excluded.current, "
                            "next_version = excluded.next_version", (task, number, number + 1))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            return record

    def set_current(self, task: str, version: int) -> None:
        with self._lock:
            self._db.execute("UPDATE tasks SET current = ? WHERE task = ?", (version, task))

    def delete(self, task: str) -> None:
        """The task disappears; its number sequence is kept so version numbers never repeat."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            cur.execute("UPDATE tasks SET current = NULL WHERE task = ?", (task,))
            cur.execute("DELETE FROM versions WHERE task = ?", (task,))
            cur.execute("COMMIT")

    def unreferenced(self, sha256: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM versions WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone() is None

    def remove_blob(self, sha256: str) -> None:
        self.blob_path(sha256).unlink(missing_ok=True)

    def load_all(self) -> tuple[dict[str, int], dict[str, list[VersionRecord]]]:
        """(task → current version, task → its versions) for every live task."""
        with self._lock:
            current = {task: cur for task, cur in
                       self._db.execute("SELECT task, current FROM tasks WHERE current IS NOT NULL")}
            versions: dict[str, list[VersionRecord]] = {}
            for row in self._db.execute("SELECT task, version, sha256, kind, labels, params, bytes, created_at "
                                        "FROM versions ORDER BY task, version"):
                if row[0] in current:
                    versions.setdefault(row[0], []).append(
                        VersionRecord(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], row[6], row[7]))
            return current, versions
