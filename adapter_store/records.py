"""The records a store keeps: task versions, tenants, API keys. Immutable; stores of every backend
return these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

DEFAULT_TENANT = "default"  # the only tenant in open mode; tasks of pre-tenancy data directories
TaskKey = tuple[str, str]  # (tenant, task)


@dataclass(frozen=True)
class VersionRecord:
    """One acknowledged, immutable task version: the only declaration of it (the registry wraps it,
    the HTTP schemas derive from it)."""

    tenant: str
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

    @property
    def key(self) -> TaskKey:
        return (self.tenant, self.task)

    # what a client sees of a version (the API's version summary), in the contract's order
    SUMMARY_FIELDS: ClassVar[tuple[str, ...]] = ("task", "version", "kind", "num_labels", "labels", "params",
                                                 "bytes", "sha256")

    def summary(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.SUMMARY_FIELDS}


@dataclass(frozen=True)
class TenantRecord:
    """A tenant and its quota overrides (None: the server's default)."""

    tenant: str
    created_at: float
    max_tasks: int | None = None
    max_adapter_bytes: int | None = None
    max_queued_rows: int | None = None


SCOPES: tuple[str, ...] = ("classify", "manage")


@dataclass(frozen=True)
class KeyRecord:
    """An API key; only the SHA-256 of its secret is ever stored."""

    id: str
    hash: str
    tenant: str
    scopes: tuple[str, ...]
    name: str | None
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None

    def valid(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True)
class StoreChange:
    """What another replica changed, as the store reports it: one task (re-read it), the keys, the
    tenants, or everything (after a reconnect, when notifications may have been missed)."""

    kind: Literal["task", "keys", "tenants", "resync"]
    tenant: str | None = None
    task: str | None = None


class StoreInUseError(RuntimeError):
    """Another live process holds the data directory."""


class StoreUnavailable(RuntimeError):
    """The shared store cannot be reached now (the server keeps serving what it holds)."""
