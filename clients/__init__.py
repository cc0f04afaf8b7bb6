"""Switchboard clients. `from switchboard.clients import Client` gives the typed SDK (it needs only
httpx); the `switchboard` command line lives in `switchboard.clients.cli`."""

from switchboard.clients.sdk import (
    AsyncClient,
    ClassifyResult,
    Client,
    InsufficientCapacity,
    InvalidAdapter,
    InvalidRequest,
    Job,
    JobNotFound,
    Overloaded,
    PayloadTooLarge,
    Prediction,
    ServerError,
    SwitchboardError,
    Task,
    TaskNotFound,
    TaskVersion,
    Unavailable,
    VersionNotFound,
)

__all__ = ["AsyncClient", "ClassifyResult", "Client", "InsufficientCapacity", "InvalidAdapter", "InvalidRequest",
           "Job", "JobNotFound", "Overloaded", "PayloadTooLarge", "Prediction", "ServerError", "SwitchboardError",
           "Task", "TaskNotFound", "TaskVersion", "Unavailable", "VersionNotFound"]
