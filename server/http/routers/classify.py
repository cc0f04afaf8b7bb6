"""Classification and embeddings: decode → lease the task versions → tokenize → batch → predict → encode."""

from __future__ import annotations

import asyncio
import logging
from contextlib import ExitStack

import numpy as np
import torch
from fastapi import APIRouter, Request, Response

from switchboard.server.core.engine import CapacityError
from switchboard.server.core.tokenize import tokenize
from switchboard.server.errors import InsufficientCapacity, PayloadTooLarge
from switchboard.server.http.auth import ClassifyAuth
from switchboard.server.http.deps import ERRORS, RuntimeDep, SettingsDep
from switchboard.server.http.schemas import (
    BackboneInfo,
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    FanOutResponse,
    Prediction,
)
from switchboard.server.runtime.batcher import WorkItem
from switchboard.server.runtime.builder import Runtime
from switchboard.server.settings import Settings

router = APIRouter(tags=["classification"])
log = logging.getLogger(__name__)
# the largest finite float32: a score past it (or NaN) cannot be sent as a JSON number (it became null)
F32_MAX = float(torch.finfo(torch.float32).max)


@router.get("/v1/backbone", response_model=BackboneInfo, responses=ERRORS)
def backbone(runtime: RuntimeDep, principal: ClassifyAuth) -> BackboneInfo:
    return BackboneInfo(**runtime.engine.spec.as_dict())


@router.post("/v1/classify", response_model=ClassifyResponse | FanOutResponse, responses=ERRORS)
async def classify(body: ClassifyRequest, request: Request, runtime: RuntimeDep, settings: SettingsDep,
                   principal: ClassifyAuth) -> ClassifyResponse | FanOutResponse:
    """Classify one text or a list with one of the caller's tasks, or (`tasks`) with several at once:
    every text under every task in the same mixed batch. Another tenant's task is a 404."""
    texts = _texts(body.inputs, settings, runtime)
    names = body.tasks if body.tasks is not None else [body.task]
    if len(names) > settings.max_fanout_tasks:
        raise PayloadTooLarge(f"{len(names)} tasks; at most {settings.max_fanout_tasks} per request (max_fanout_tasks)")
    if len(names) * len(texts) > settings.max_inputs_per_request:
        raise PayloadTooLarge(f"{len(texts)} inputs × {len(names)} tasks = {len(texts) * len(names)} rows; at most "
                              f"{settings.max_inputs_per_request} per request (max_inputs_per_request)")
    tenant, queued_rows = principal.tenant, runtime.tenancy.quotas(principal.tenant).max_queued_rows
    # refuse before spending a tokenizer call (overloaded, or this tenant's own queue is full)
    runtime.batcher.precheck(tenant, queued_rows, len(names) * len(texts),
                             len(names) * _token_floor(texts, runtime.engine.spec.max_length, settings))
    with ExitStack() as held:  # every lease is released here unless handed to the batcher
        leases = [held.enter_context(runtime.registry.acquire((tenant, name))) for name in names]
        records = [lease.record for lease in leases]
        cold = False
        for name, lease in zip(names, leases):
            if lease.slot is None:  # evicted or restored from the store: load it off the loop
                cold = True
                try:
                    await runtime.request_pool.run(runtime.registry.ensure_resident, lease)
                except CapacityError as exc:
                    raise InsufficientCapacity(f"no device slot free for task {name!r}: {exc}") from exc
        ids, mask = await _tokenize(runtime, settings, texts)
        if len(leases) > 1:
            ids, mask = np.tile(ids, (len(leases), 1)), np.tile(mask, (len(leases), 1))
        item = runtime.batcher.submit([lease.transfer() for lease in leases], ids, mask, settings.request_timeout_s,
                                      tenant=tenant, max_queued_rows=queued_rows, cold_load=cold)
    logits = await _answer(request, runtime, item)
    if logits is None:
        return Response(status_code=499)  # type: ignore[return-value]
    results = [ClassifyResponse(task=name, version=record.version,
                                predictions=_predictions(part, record.labels, body.raw_scores, body.top_k, name))
               for name, record, part in zip(names, records, torch.chunk(logits, len(names)))]
    return results[0] if body.tasks is None else FanOutResponse(results=results)


@router.post("/v1/embed", response_model=EmbedResponse, responses=ERRORS)
async def embed(body: EmbedRequest, request: Request, runtime: RuntimeDep, settings: SettingsDep,
                principal: ClassifyAuth) -> EmbedResponse:
    """The frozen backbone's mean-pooled embeddings (sentence-transformers' own for MiniLM), computed in
    the same batches as classification traffic."""
    texts = _texts(body.inputs, settings, runtime)
    tenant, queued_rows = principal.tenant, runtime.tenancy.quotas(principal.tenant).max_queued_rows
    runtime.batcher.precheck(tenant, queued_rows, len(texts), _token_floor(texts, runtime.engine.spec.max_length,
                                                                           settings))
    ids, mask = await _tokenize(runtime, settings, texts)
    item = runtime.batcher.submit(runtime.embedding.lease(), ids, mask, settings.request_timeout_s, tenant=tenant,
                                  max_queued_rows=queued_rows)
    logits = await _answer(request, runtime, item)
    if logits is None:
        return Response(status_code=499)  # type: ignore[return-value]
    dim = runtime.embedding.dim
    vectors = logits[:, :dim]
    if body.normalize:
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
    return EmbedResponse(embeddings=vectors.tolist(), dim=dim)


def _texts(inputs: str | list[str], settings: Settings, runtime: Runtime) -> list[str]:
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    if len(texts) > settings.max_inputs_per_request:
        raise PayloadTooLarge(f"{len(texts)} inputs; at most {settings.max_inputs_per_request} per request")
    longest = max(map(len, texts))
    if longest > settings.max_input_chars:
        raise PayloadTooLarge(f"an input of {longest} characters; at most {settings.max_input_chars} "
                              f"(inputs are truncated to {runtime.engine.spec.max_length} tokens anyway)")
    return texts


def _token_floor(texts: list[str], max_length: int, settings: Settings) -> int:
    """Fewest padded tokens the texts can take: subword tokenizers split on whitespace first, so each word
    is at least one token (plus the two special tokens), up to max_length. Worked out for large requests
    only — a small one is tokenized on the loop at once anyway."""
    if sum(map(len, texts)) <= settings.inline_tokenize_chars:
        return 0
    return len(texts) * min(max_length, max(len(text.split()) for text in texts) + 2)


async def _tokenize(runtime: Runtime, settings: Settings, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tokenizer, max_length = runtime.engine.backbone.tokenizer, runtime.engine.spec.max_length
    if sum(map(len, texts)) <= settings.inline_tokenize_chars:  # cheaper here than a hop to a thread
        return tokenize(tokenizer, texts, max_length)
    return await runtime.request_pool.run(tokenize, tokenizer, texts, max_length)


async def _answer(request: Request, runtime: Runtime, item: WorkItem) -> torch.Tensor | None:
    """The item's logits, or None if the client left first (the request is then dropped)."""
    answer = asyncio.ensure_future(runtime.batcher.result(item))
    watch = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({answer, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not answer.done():  # the client left: drop the request, nobody reads the answer
        item.future.cancel()
        answer.cancel()
        return None
    return answer.result()


async def _client_gone(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _predictions(logits: torch.Tensor, labels: list[str], raw: bool, top_k: int | None,
                 task: str = "") -> list[list[Prediction]]:
    """Scores are always finite numbers, as the schema promises (never null): upload refuses weights
    that overflow, but a reduced-precision forward pass still can. Logits are taken in float64, NaN
    made the lowest score and ±inf clamped to ±float32's largest value (raw scores), and the softmax of
    those is finite and sums to 1 (float64's range holds any difference of two clamped logits)."""
    scores = logits[:, : len(labels)].to(torch.float64)
    if not bool(torch.isfinite(scores).all()):
        log.warning("task %r produced non-finite logits; answered with clamped scores", task)
        scores = scores.nan_to_num(nan=-F32_MAX, posinf=F32_MAX, neginf=-F32_MAX)
    scores = scores.clamp(-F32_MAX, F32_MAX)
    if not raw:
        scores = torch.softmax(scores, dim=-1)
    k = min(top_k or len(labels), len(labels))
    values, indices = torch.topk(scores, k, dim=-1)
    return [[Prediction(label=labels[i], score=v) for v, i in zip(vals, idx, strict=True)]
            for vals, idx in zip(values.tolist(), indices.tolist(), strict=True)]
