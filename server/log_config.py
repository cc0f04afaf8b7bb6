"""Logging set-up: one format for our loggers and uvicorn's, text or JSON, each line with a request id.

The request id lives in a context variable set per request by the HTTP edge (echoing a client's
`X-Request-Id` or generating one); every log line written while serving that request carries it, so
a client's 500 body points at the traceback in the log.
"""

from __future__ import annotations

import logging
import logging.config
from contextvars import ContextVar
from typing import Any, Literal

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID: ContextVar[str] = ContextVar("switchboard_request_id", default="-")
LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def json_formatter() -> logging.Formatter:
    return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s",
                         rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                         timestamp=False)


def logging_config(level: str = "info", fmt: LogFormat = "text") -> dict[str, Any]:
    """A dictConfig for the root logger and uvicorn's loggers (pass it to uvicorn as `log_config`)."""
    formatter: dict[str, Any] = ({"()": json_formatter} if fmt == "json" else {"format": TEXT_FORMAT})
    handler = {"class": "logging.StreamHandler", "formatter": "switchboard", "filters": ["request_id"],
               "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"switchboard": formatter},
        "handlers": {"default": handler},
        "root": {"handlers": ["default"], "level": level.upper()},
        "loggers": {name: {"handlers": [], "propagate": True, "level": level.upper()}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def configure_logging(level: str = "info", fmt: LogFormat = "text") -> None:
    logging.config.dictConfig(logging_config(level, fmt))
