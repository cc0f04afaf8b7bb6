"""Classification: decode → lease the task version → tokenize → batch → predict → encode."""

from __future__ import annotations

import asyncio

import torch
from fastapi import APIRouter, Request, Response

from switchboard.server.core.engine import CapacityError
from switchboard.server.core.tokenize import tokenize
from switchboard.server.errors import InsufficientCapacity, InvalidRequest, PayloadTooLarge
from switchboard.server.http.auth import ClassifyAuth
from switchboard.server.http.deps import ERRORS, RuntimeDep, SettingsDep
from switchboard.server.http.schemas import BackboneInfo, ClassifyRequest, ClassifyResponse, Prediction

router = APIRouter(tags=["classification"])


@router.get("/v1/backbone", response_model=BackboneInfo, responses=ERRORS)
def backbone(runtime: RuntimeDep, principal: ClassifyAuth) -> BackboneInfo:
    return BackboneInfo(**runtime.engine.spec.as_dict())


@router.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS)
async def classify(body: ClassifyRequest, request: Request, runtime: RuntimeDep, settings: SettingsDep,
                   principal: ClassifyAuth) -> ClassifyResponse:
    """Classify one text or a list with one of the caller's tasks (another tenant's task: 404)."""
    texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    if not texts:
        raise InvalidRequest("inputs must hold at least one text")
    if len(texts) > settings.max_inputs_per_request:
        raise PayloadTooLarge(f"{len(texts)} inputs; at most {settings.max_inputs_per_request} per request")
    longest = max(map(len, texts))
    if longest > settings.max_input_chars:
        raise PayloadTooLarge(f"an input of {longest} characters; at most {settings.max_input_chars} "
                              f"(inputs are truncated to {runtime.engine.spec.max_length} tokens anyway)")
    tenant, queued_rows = principal.tenant, runtime.tenancy.quotas(principal.tenant).max_queued_rows
    runtime.batcher.precheck(tenant, queued_rows)  # overloaded: refuse before spending a tokenizer call
    with runtime.registry.acquire((tenant, body.task)) as lease:  # released here unless handed to the batcher
        record = lease.record
        cold = lease.slot is None
        if cold:  # evicted or restored from the store: load it off the loop
            try:
                await runtime.request_pool.run(runtime.registry.ensure_resident, lease)
            except CapacityError as exc:
                raise InsufficientCapacity(f"no device slot free for task {body.task!r}: {exc}") from exc
        tokenizer, max_length = runtime.engine.backbone.tokenizer, runtime.engine.spec.max_length
        if sum(map(len, texts)) <= settings.inline_tokenize_chars:  # cheaper here than a hop to a thread
            ids, mask = tokenize(tokenizer, texts, max_length)
        else:
            ids, mask = await runtime.request_pool.run(tokenize, tokenizer, texts, max_length)
        item = runtime.batcher.submit(lease.transfer(), ids, mask, settings.request_timeout_s, tenant=tenant,
                                      max_queued_rows=queued_rows, cold_load=cold)
    answer = asyncio.ensure_future(runtime.batcher.result(item))
    watch = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({answer, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not answer.done():  # the client left: drop the request, nobody reads the answer
        item.future.cancel()
        answer.cancel()
        return Response(status_code=499)  # type: ignore[return-value]
    return ClassifyResponse(task=body.task, version=record.version,
                            predictions=_predictions(answer.result(), record.labels, body.raw_scores, body.top_k))


async def _client_gone(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _predictions(logits: torch.Tensor, labels: list[str], raw: bool, top_k: int | None) -> list[list[Prediction]]:
    scores = logits[:, : len(labels)]
    if not raw:
        scores = torch.softmax(scores, dim=-1)
    k = min(top_k or len(labels), len(labels))
    values, indices = torch.topk(scores, k, dim=-1)
    return [[Prediction(label=labels[i], score=v) for v, i in zip(vals, idx, strict=True)]
            for vals, idx in zip(values.tolist(), indices.tolist(), strict=True)]
