"""Content-addressed blob files: `<dir>/<sha256>.safetensors`, written durably (temp file → fsync →
rename → fsync dir). The SQLite store keeps its blobs here; the PostgreSQL store uses the same layout
as each replica's local cache of the blobs it holds in the database."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


class BlobFiles:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / f"{sha256}.safetensors"

    def write(self, sha256: str, data: bytes) -> None:
        """Durable and atomic; an existing blob (same content) is kept."""
        path = self.path(sha256)
        if path.exists():
            return
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.root)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read(self, sha256: str) -> bytes | None:
        """The blob, or None if absent. (The name is the adapter's content hash, not the file's: the
        native parser checks what it reads.)"""
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def sweep(self, referenced: Iterable[str]) -> int:
        """Remove temp files and blobs no version refers to (a crash between blob and commit); returns
        how many blobs went."""
        for tmp in self.root.glob(".tmp-*"):
            tmp.unlink(missing_ok=True)
        keep = set(referenced)
        removed = 0
        for blob in self.root.glob("*.safetensors"):
            if blob.stem not in keep:
                blob.unlink(missing_ok=True)
                removed += 1
        return removed
