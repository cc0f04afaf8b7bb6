"""Classification and embeddings: thin callers of the pipeline's stages (pipeline.py).

Well-formed JSON bodies are served by `pipeline.FastPath` before FastAPI routes them; these routes
declare the API (OpenAPI) and serve every other body — pydantic validates it here and the error
handlers word what is wrong."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from switchboard.server.http.auth import ClassifyAuth
from switchboard.server.http.deps import ERRORS, PipelineDep, ServingDep
from switchboard.server.http.pipeline import Call, ClientGone, disconnected
from switchboard.server.http.schemas import (
    BackboneInfo,
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    FanOutResponse,
    RerankRequest,
    RerankResponse,
)
from switchboard.server.runtime.tenancy import Principal

router = APIRouter(tags=["classification"])


@router.get("/v1/backbone", response_model=BackboneInfo, responses=ERRORS)
def backbone(serving: ServingDep, principal: ClassifyAuth) -> BackboneInfo:
    return BackboneInfo(**serving.spec.as_dict())


@router.post("/v1/classify", response_model=ClassifyResponse | FanOutResponse, responses=ERRORS)
async def classify(body: ClassifyRequest, request: Request, pipeline: PipelineDep,
                   principal: ClassifyAuth) -> Response:
    """Classify one text or a list with one of the caller's tasks, or (`tasks`) with several at once:
    every text under every task in the same mixed batch. Another tenant's task is a 404."""
    try:
        return _json(await pipeline.classify(body, _call(request, principal)))
    except ClientGone:
        return Response(status_code=499)


@router.post("/v1/rerank", response_model=RerankResponse, responses=ERRORS)
async def rerank(body: RerankRequest, request: Request, pipeline: PipelineDep, principal: ClassifyAuth) -> Response:
    """Score every document against the query with one of the caller's pair tasks (each pair
    [query, document] is a row of the same mixed batch as everyone's traffic); sorted, best first."""
    try:
        return _json(await pipeline.rerank(body, _call(request, principal)))
    except ClientGone:
        return Response(status_code=499)


@router.post("/v1/embed", response_model=EmbedResponse, responses=ERRORS)
async def embed(body: EmbedRequest, request: Request, pipeline: PipelineDep, principal: ClassifyAuth) -> Response:
    """The frozen backbone's mean-pooled embeddings (sentence-transformers' own for MiniLM), computed in
    the same batches as classification traffic."""
    try:
        return _json(await pipeline.embed(body, _call(request, principal)))
    except ClientGone:
        return Response(status_code=499)


def _call(request: Request, principal: Principal) -> Call:
    return Call(principal, request.headers.get("authorization"), request.headers.get("x-switchboard-tenant"),
                lambda: disconnected(request.receive))


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")
