"""What every HTTP process runs in front of its routes — the scheduler's (front 0) and each front's:
the middleware (request ids, metrics, the header gate, body limits), the error handlers and the fast
path. One place, so a front answers exactly as front 0 does."""

from __future__ import annotations

from switchboard.server.http.deps import AppState
from switchboard.server.http.handlers import api_error_renderer, install_error_handlers
from switchboard.server.http.middleware import (
    BodyLimitMiddleware,
    GateMiddleware,
    MetricsMiddleware,
    RequestIdMiddleware,
    RequestIds,
    UploadPermits,
)
from switchboard.server.http.pipeline import FastPath, SwitchboardAPI


def install_request_path(app: SwitchboardAPI, state: AppState, front: int | None) -> None:
    """front: this process's front index when the server runs several (sent as X-Switchboard-Front)."""
    s, metrics = state.settings, state.metrics
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=s.max_body_bytes, max_upload_bytes=s.max_upload_bytes,
                       max_train_body_bytes=s.max_train_body_bytes)
    app.add_middleware(GateMiddleware, state=state, metrics=metrics,
                       permits=UploadPermits(s.max_pending_uploads, s.tenant_max_pending_uploads))
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware, metrics=metrics, front=front)  # outermost
    install_error_handlers(app, metrics)
    app.fast_path = FastPath(state, metrics, api_error_renderer(metrics), RequestIds(), front=front)
