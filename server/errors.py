"""API errors: every failure leaves as {"error": {"type", "message"}} with a fitting status."""

from __future__ import annotations


class ApiError(Exception):
    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class TaskNotFound(ApiError):
    status, type = 404, "task_not_found"


class VersionNotFound(ApiError):
    status, type = 404, "version_not_found"


class InvalidAdapter(ApiError):
    status, type = 422, "invalid_adapter"


class InvalidRequest(ApiError):
    status, type = 422, "invalid_request"


class NotARerankTask(ApiError):
    """/v1/rerank named a task whose labels are not one relevance score (1 label) or irrelevant/relevant (2)."""

    status, type = 422, "not_a_rerank_task"


class CanaryFailed(ApiError):
    """The uploaded version misclassified its canary texts; the previous version stays current."""

    status, type = 409, "canary_failed"


class PayloadTooLarge(ApiError):
    status, type = 413, "payload_too_large"


class Overloaded(ApiError):
    status, type = 429, "overloaded"


class NotReady(ApiError):
    status, type = 503, "not_ready"


class DeadlineExceeded(ApiError):
    status, type = 503, "deadline_exceeded"


class EngineUnavailable(ApiError):
    """An engine worker died or hung during the batch; it is being restarted."""

    status, type = 503, "engine_unavailable"


class InsufficientCapacity(ApiError):
    status, type = 507, "insufficient_capacity"


class QuotaExceeded(ApiError):
    """A tenant's storage quota (tasks, adapter bytes)."""

    status, type = 507, "quota_exceeded"


class Unauthorized(ApiError):
    status, type = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, {"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    status, type = 403, "forbidden"


class KeyNotFound(ApiError):
    status, type = 404, "key_not_found"


class TenantNotFound(ApiError):
    status, type = 404, "tenant_not_found"
