"""Switchboard clients. `from switchboard.clients import Client` gives the typed SDK (it needs only
httpx); the `switchboard` command line lives in `switchboard.clients.cli`."""

from switchboard.clients.sdk import (
    ApiKey,
    AsyncClient,
    CanaryFailed,
    ClassifyResult,
    Client,
    Forbidden,
    InsufficientCapacity,
    InvalidAdapter,
    InvalidRequest,
    Job,
    JobNotFound,
    KeyNotFound,
    Overloaded,
    PayloadTooLarge,
    Prediction,
    QuotaExceeded,
    ServerError,
    SwitchboardError,
    Task,
    TaskNotFound,
    TaskVersion,
    TenantNotFound,
    Unauthorized,
    Unavailable,
    VersionNotFound,
)

__all__ = ["ApiKey", "AsyncClient", "CanaryFailed", "ClassifyResult", "Client", "Forbidden", "InsufficientCapacity",
           "InvalidAdapter", "InvalidRequest", "Job", "JobNotFound", "KeyNotFound", "Overloaded", "PayloadTooLarge",
           "Prediction", "QuotaExceeded", "ServerError", "SwitchboardError", "Task", "TaskNotFound", "TaskVersion",
           "TenantNotFound", "Unauthorized", "Unavailable", "VersionNotFound"]
