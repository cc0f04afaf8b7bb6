"""Operations: readiness and Prometheus metrics (no key, no task names)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from switchboard.server.http.deps import RuntimeDep, StateDep
from switchboard.server.http.schemas import ErrorResponse, Health

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}})
def health(runtime: RuntimeDep) -> Health:
    """200 once the backbone is loaded and the batcher runs; 503 (with the reason) before."""
    return Health(status="ok")


@router.get("/metrics", response_class=Response)
def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
