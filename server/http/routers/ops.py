"""Operations: readiness and Prometheus metrics (no key, no task names)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from switchboard.server.http.deps import RuntimeDep, StateDep
from switchboard.server.http.schemas import ErrorResponse, Health
from switchboard.server.metrics import MergedRegistry

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}})
def health(runtime: RuntimeDep) -> Health:
    """200 once the backbone is loaded and the batcher runs; 503 (with the reason) before. "degraded"
    (still 200: the replica keeps serving what it holds) while a shared store cannot be reached."""
    up = runtime.store.healthy()
    return Health(status="ok" if up else "degraded")


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    """One exposition for the whole server: with front processes, theirs are fetched and summed in."""
    if state.runtime is not None:
        state.metrics.store_up.set(1 if state.runtime.store.healthy() else 0)
    registry = state.metrics.registry
    if state.fronts is not None and state.fronts.endpoint is not None:
        registry = MergedRegistry(registry, await state.fronts.endpoint.front_metrics(state.fronts.identities))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
