"""Classify and embed as named stages: decode → resolve → tokenize → schedule → forward → encode.

`decode` (here) turns a body into the request model; `Pipeline.classify` / `Pipeline.embed` check the
request's size, tokenize it (the `TextEncoder`, on the loop for small requests), hand the scheduler a
`Job` — which resolves the task versions, schedules the rows and waits for their forward pass
(`serving.LocalServing.run`, in this process or over the front link) — and `encode` the answer as JSON
bytes (orjson). The FastAPI routes (routers/classify.py) and the fast path (`FastPath`, below) are two
thin callers of the same stages: the fast path takes well-formed JSON bodies without FastAPI's
per-request machinery; anything its decode refuses goes to the routes, whose pydantic validation
words the error. Both decode with the same pydantic model, so both accept exactly the same bodies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.core.tokenize import Input, TextEncoder, input_chars
from switchboard.server.errors import ApiError, PayloadTooLarge
from switchboard.server.http.schemas import ClassifyRequest, EmbedRequest, RerankRequest
from switchboard.server.log_config import REQUEST_ID
from switchboard.server.runtime.executors import BoundedExecutor
from switchboard.server.runtime.serving import Answer, Job
from switchboard.server.runtime.tenancy import Principal
from switchboard.server.settings import Settings

log = logging.getLogger(__name__)

F32_MAX = float(np.finfo(np.float32).max)  # a score past it (or NaN) cannot be sent as a JSON number


class Serving(Protocol):
    """What the stages need from the scheduler: `LocalServing` or `front_link.RemoteServing`."""

    spec: BackboneSpec | None
    embedding_dim: int

    def precheck(self, tenant: str, rows: int, min_tokens: int) -> None: ...

    async def run(self, job: Job) -> Answer: ...


class ClientGone(Exception):
    """The client closed its connection before the answer: nothing is sent (logged as 499)."""


@dataclass(frozen=True)
class Call:
    """One request as the stages see it: who asks, how to notice the client leaving."""

    principal: Principal
    authorization: str | None
    tenant_header: str | None
    disconnected: Callable[[], Awaitable[None]]


class Pipeline:
    def __init__(self, serving: Serving, settings: Settings, encoder: TextEncoder, pool: BoundedExecutor) -> None:
        self.serving = serving
        self.settings = settings
        self.encoder = encoder
        self.pool = pool  # tokenizing large requests off the loop

    # ----- the two requests --------------------------------------------------------------------------
    async def classify(self, body: ClassifyRequest, call: Call) -> bytes:
        s = self.settings
        texts = self._texts(body.inputs)
        names = body.tasks if body.tasks is not None else [body.task]
        if len(names) > s.max_fanout_tasks:
            raise PayloadTooLarge(f"{len(names)} tasks; at most {s.max_fanout_tasks} per request (max_fanout_tasks)")
        if len(names) * len(texts) > s.max_inputs_per_request:
            raise PayloadTooLarge(f"{len(texts)} inputs × {len(names)} tasks = {len(texts) * len(names)} rows; at most "
                                  f"{s.max_inputs_per_request} per request (max_inputs_per_request)")
        tenant = call.principal.tenant
        floor = self._token_floor(texts)
        if floor:  # a large request: refuse it before spending a tokenizer call (a small one is cheaper to submit)
            self.serving.precheck(tenant, len(names) * len(texts), len(names) * floor)
        ids, mask = await self.tokenize(texts)
        answer = await self.forward(Job(tenant, list(names), ids, mask, s.request_timeout_s, call.authorization,
                                        call.tenant_header), call)
        return encode_classify(names, answer, body.raw_scores, body.top_k, fan_out=body.tasks is not None)

    async def embed(self, body: EmbedRequest, call: Call) -> bytes:
        texts = self._texts(body.inputs)
        tenant = call.principal.tenant
        floor = self._token_floor(texts)
        if floor:
            self.serving.precheck(tenant, len(texts), floor)
        ids, mask = await self.tokenize(texts)
        answer = await self.forward(Job(tenant, [], ids, mask, self.settings.request_timeout_s, call.authorization,
                                        call.tenant_header), call)
        return encode_embeddings(answer, self.serving.embedding_dim, body.normalize)

    async def rerank(self, body: RerankRequest, call: Call) -> bytes:
        """Every document scored as the pair (query, document) by one pair task, in one job."""
        pairs: list[Input] = [(body.query, document) for document in body.documents]
        self._texts(pairs)
        tenant = call.principal.tenant
        floor = self._token_floor(pairs)
        if floor:
            self.serving.precheck(tenant, len(pairs), floor)
        ids, mask = await self.tokenize(pairs)
        answer = await self.forward(Job(tenant, [body.task], ids, mask, self.settings.request_timeout_s,
                                        call.authorization, call.tenant_header, max_labels=2), call)
        return encode_rerank(body, answer)

    # ----- stages ------------------------------------------------------------------------------------
    async def tokenize(self, texts: list[Input]) -> tuple[np.ndarray, np.ndarray]:
        if sum(map(input_chars, texts)) <= self.settings.inline_tokenize_chars:  # cheaper here than a hop to a thread
            return self.encoder(texts)
        return await self.pool.run(self.encoder, texts)

    async def forward(self, job: Job, call: Call) -> Answer:
        """resolve → schedule → forward, by the scheduler; ClientGone if the client leaves first (the job is
        then cancelled: its rows are dropped unless their forward pass already started)."""
        answer = asyncio.ensure_future(self.serving.run(job))
        watch = asyncio.ensure_future(call.disconnected())
        try:
            await asyncio.wait({answer, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not answer.done():
            answer.cancel()
            raise ClientGone
        return answer.result()

    def _texts(self, inputs: str | list[Input]) -> list[Input]:
        s = self.settings
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if len(texts) > s.max_inputs_per_request:
            raise PayloadTooLarge(f"{len(texts)} inputs; at most {s.max_inputs_per_request} per request")
        longest = max(map(input_chars, texts))  # a pair's two texts together
        if longest > s.max_input_chars:
            raise PayloadTooLarge(f"an input of {longest} characters; at most {s.max_input_chars} "
                                  f"(inputs are truncated to {self.encoder.max_length} tokens anyway)")
        return texts

    def _token_floor(self, texts: list[Input]) -> int:
        """Fewest padded tokens the texts can take: subword tokenizers split on whitespace first, so each word
        is at least one token (plus the two special tokens), up to max_length. Worked out for large requests
        only — a small one is tokenized on the loop at once anyway."""
        if sum(map(input_chars, texts)) <= self.settings.inline_tokenize_chars:
            return 0
        return len(texts) * min(self.encoder.max_length, max(map(_words, texts)) + 2)


def _words(item: Input) -> int:
    """Fewest tokens the input's text takes, special tokens aside (a pair's middle separator counted)."""
    return len(item.split()) if isinstance(item, str) else len(item[0].split()) + len(item[1].split()) + 1


# ----- encode ------------------------------------------------------------------------------------------
def predictions(logits: np.ndarray, labels: list[str], raw: bool, top_k: int | None,
                task: str = "", temperature: float = 1.0) -> list[list[dict[str, Any]]]:
    """Scores are always finite numbers, as the schema promises (never null): logits in float64, NaN made
    the lowest score and ±inf clamped to ±float32's largest value (raw scores); the softmax of those is
    finite and sums to 1 (float64's range holds any difference of two clamped logits). Few numpy calls:
    on a one-row answer each costs more than the arithmetic (this was a tenth of a request's CPU)."""
    scores = logits[:, : len(labels)].astype(np.float64)
    if not np.isfinite(scores).all():
        log.warning("task %r produced non-finite logits; answered with clamped scores", task)
        scores = np.nan_to_num(scores, nan=-F32_MAX, posinf=F32_MAX, neginf=-F32_MAX)
    if not raw:
        if temperature != 1.0:
            scores = scores / temperature
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
    k = min(top_k or len(labels), len(labels))
    index = range(len(labels))
    out = []
    for row in scores.tolist():  # one JSON object per row and label is built anyway
        best = sorted(index, key=row.__getitem__, reverse=True)[:k]  # stable: ties keep label order
        out.append([{"label": labels[i], "score": row[i]} for i in best])
    return out


def encode_classify(names: list[str], answer: Answer, raw: bool, top_k: int | None, fan_out: bool) -> bytes:
    parts = np.split(answer.logits, len(names)) if len(names) > 1 else [answer.logits]
    results = [{"task": name, "version": task.version,
                "predictions": predictions(part, task.labels, raw, top_k, name, task.temperature)}
               for name, task, part in zip(names, answer.tasks, parts, strict=True)]
    return orjson.dumps({"results": results} if fan_out else results[0])


def relevance(logits: np.ndarray, labels: list[str], raw: bool, temperature: float = 1.0) -> np.ndarray:
    """One relevance score per row: a one-label task's logit (sigmoid unless raw); a two-label task's
    second label (softmax probability, or the logit margin over the first if raw). Tasks with more
    labels never get here: the scheduler refuses them at resolve (`Job.max_labels`)."""
    scores = np.nan_to_num(logits[:, : len(labels)].astype(np.float64), nan=-F32_MAX, posinf=F32_MAX,
                           neginf=-F32_MAX)
    if len(labels) == 1:
        return scores[:, 0] if raw else _sigmoid(scores[:, 0] / temperature)
    margin = scores[:, 1] - scores[:, 0]
    return margin if raw else _sigmoid(margin / temperature)  # = softmax(scores / T)[:, 1]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for any finite x


def encode_rerank(body: RerankRequest, answer: Answer) -> bytes:
    task = answer.tasks[0]
    values = relevance(answer.logits, task.labels, body.raw_scores, task.temperature)
    order = np.argsort(-values, kind="stable")[: body.top_n]
    scores = values.tolist()
    results = [{"index": i, "relevance_score": scores[i], "document": body.documents[i]} if body.return_documents
               else {"index": i, "relevance_score": scores[i]} for i in order.tolist()]
    return orjson.dumps({"task": body.task, "version": task.version, "results": results})


def encode_embeddings(answer: Answer, dim: int, normalize: bool) -> bytes:
    vectors = answer.logits[:, :dim].astype(np.float64)
    if normalize:
        norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return orjson.dumps({"embeddings": vectors, "dim": dim}, option=orjson.OPT_SERIALIZE_NUMPY)


# ----- the fast path -----------------------------------------------------------------------------------
_FAST = {"/v1/classify": ClassifyRequest, "/v1/embed": EmbedRequest, "/v1/rerank": RerankRequest}


def decode(model: type[ClassifyRequest] | type[EmbedRequest] | type[RerankRequest],
           body: bytes) -> ClassifyRequest | EmbedRequest | RerankRequest | None:
    """The request, or None when pydantic refuses it (the route then words the error)."""
    try:
        return model.model_validate_json(body)
    except ValidationError:
        return None


class FastPath:
    """POST /v1/classify and /v1/embed, served straight from the stages before FastAPI's stack (the app
    calls it first: `SwitchboardAPI.__call__`). It takes only the happy path — a JSON body within
    `max_body_bytes` (from Content-Length), a key that may classify, a tenant not throttled, a body the
    request model accepts — and does for it what the middleware does: the request id, the auth (before
    the body is read), the throttle's 429, the metrics. Anything else goes to the full stack, with the
    body replayed if it was read, and the middleware and routes answer it exactly as before."""

    def __init__(self, state: Any, metrics: Any, render_error: Callable[[ApiError], tuple[int, dict, bytes]],
                 request_ids: Any, front: int | None = None) -> None:
        self.state = state
        self.metrics = metrics
        self._render_error = render_error
        self._ids = request_ids
        self._front = [(b"x-switchboard-front", str(front).encode())] if front is not None else []
        self._durations = {path: metrics.request_duration.labels(f"POST {path}") for path in _FAST}

    async def __call__(self, scope: Scope, receive: Receive, send: Send, slow: ASGIApp) -> None:
        model = _FAST.get(scope["path"])
        state = self.state
        pipeline, serving = state.pipeline, state.serving
        if model is None or pipeline is None or scope["method"] != "POST":
            await slow(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        content_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if (content_type != b"application/json" or not length.isdigit()
                or int(length) > state.settings.max_body_bytes):
            await slow(scope, receive, send)
            return
        authorization, tenant_header = _header(headers, b"authorization"), _header(headers, b"x-switchboard-tenant")
        try:  # from the headers, before a byte of the body
            principal = await serving.authenticate(authorization, tenant_header)
        except ApiError:
            principal = None
        if principal is None or "classify" not in principal.scopes or serving.throttle_window(principal.tenant) > 0:
            await slow(scope, receive, send)  # refused there, with the words and counts the gate uses (once)
            return
        request_id = self._ids.of(headers)
        REQUEST_ID.set(request_id)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        request = decode(model, body)
        if request is None:  # the route words the error: replay the body to it
            await slow(scope, _replay(body, receive), send)
            return
        call = Call(principal, authorization, tenant_header, lambda: disconnected(receive))
        extra: list[tuple[bytes, bytes]] = []
        try:
            if isinstance(request, ClassifyRequest):
                out = await pipeline.classify(request, call)
            elif isinstance(request, RerankRequest):
                out = await pipeline.rerank(request, call)
            else:
                out = await pipeline.embed(request, call)
            status = 200
        except ClientGone:  # nobody reads an answer; 499 is what the metrics and the access log show
            status, out = 499, b""
        except ApiError as exc:
            status, error_headers, out = self._render_error(exc)
            extra = [(k.lower().encode(), v.encode()) for k, v in error_headers.items()]
        except Exception:
            log.exception("unhandled error on POST %s (request id %s)", scope["path"], request_id)
            self.metrics.failures.labels("internal_error").inc()
            status, extra = 500, []
            out = orjson.dumps({"error": {"type": "internal_error", "message": "internal server error; quote request "
                                          f"id {request_id} when reporting it"}})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode()),
                                *extra, (b"x-request-id", request_id.encode()), *self._front]})
        await send({"type": "http.response.body", "body": out})
        self.metrics.requests.labels(f"POST {scope['path']}", str(status)).inc()
        self._durations[scope["path"]].observe(time.perf_counter() - started)


class SwitchboardAPI(FastAPI):
    """FastAPI with the fast path (`fast_path`, set once the app is built) in front of its whole stack."""

    fast_path: FastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast_path is not None and scope["type"] == "http":
            await self.fast_path(scope, receive, send, super().__call__)
        else:
            await super().__call__(scope, receive, send)


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return value.decode("latin-1") if value else None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def disconnected(receive: Receive) -> None:
    """Returns once the client has closed its connection (its request body already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
