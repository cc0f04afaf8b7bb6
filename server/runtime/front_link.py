"""Front processes ↔ the scheduler, over ZeroMQ (pyzmq) with msgspec's MessagePack. No pickle.

The scheduler binds one ROUTER socket; each front process connects a DEALER whose identity is
`front-<index>`. Frames: `[kind, request id, payload]` (the ROUTER prefixes the front's identity).

    front → scheduler   hello · auth · job · cancel · metrics (the answer to a metrics request)
    scheduler → front   hello · auth · answer · error · metrics? (asks for the front's registry text)

A job is run by the scheduler's `LocalServing.run` — the same code front 0 calls in-process — after the
key it came with is checked again (a revocation is seen by the next job, whatever the front's cache
says). `cancel` (the client left) cancels the job's task there: rows not yet in a forward pass are
dropped. When a front process dies, `SchedulerEndpoint.front_gone` cancels every job it had sent.
Arrays travel as their raw bytes with dtype and shape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import logging
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import zmq
import zmq.asyncio
from cachetools import TTLCache

from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.errors import ApiError, EngineUnavailable, Forbidden, NotReady
from switchboard.server.runtime.serving import Answer, Job, LocalServing
from switchboard.server.runtime.tenancy import Principal

log = logging.getLogger(__name__)
HWM = 100_000  # messages queued per peer; admission bounds what is in flight long before this


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        return {"dtype": a.dtype.str, "shape": list(a.shape), "data": memoryview(a).cast("B")}
    raise NotImplementedError(type(obj))


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is np.ndarray:
        return np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    raise NotImplementedError(type_)


class WirePrincipal(msgspec.Struct, frozen=True):
    tenant: str
    scopes: list[str]
    key_id: str | None
    admin: bool

    @classmethod
    def of(cls, p: Principal) -> WirePrincipal:
        return cls(p.tenant, sorted(p.scopes), p.key_id, p.admin)

    def principal(self) -> Principal:
        return Principal(self.tenant, frozenset(self.scopes), self.key_id, self.admin)


class WireError(msgspec.Struct, frozen=True):
    status: int
    type: str
    message: str
    headers: dict[str, str] = {}
    throttle_s: float = 0.0  # a 429 for the tenant's own demand: refuse its next requests from headers this long

    def error(self) -> ApiError:
        error = ApiError(self.message, self.headers)
        error.status, error.type = self.status, self.type
        return error


class Hello(msgspec.Struct, frozen=True):
    spec: dict[str, Any]
    open_mode: bool
    embedding_dim: int


class AuthQuery(msgspec.Struct, frozen=True):
    authorization: str | None
    tenant_header: str | None


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_JOB = msgspec.msgpack.Decoder(Job, dec_hook=_dec_hook)
_ANSWER = msgspec.msgpack.Decoder(Answer, dec_hook=_dec_hook)
_ERROR = msgspec.msgpack.Decoder(WireError)
_HELLO = msgspec.msgpack.Decoder(Hello)
_AUTH = msgspec.msgpack.Decoder(AuthQuery)
_PRINCIPAL = msgspec.msgpack.Decoder(WirePrincipal)


def _wire_error(exc: BaseException) -> WireError:
    if isinstance(exc, ApiError):
        return WireError(exc.status, exc.type, exc.message, dict(exc.headers))
    log.exception("a job from another front failed", exc_info=exc)
    return WireError(500, "internal_error", "internal server error")


class SchedulerEndpoint:
    """The scheduler's side: answers fronts' jobs with `LocalServing`. Event loop only."""

    def __init__(self, address: str, serving: Callable[[], LocalServing | None]) -> None:
        self.address = address
        self._serving = serving  # None while the runtime is loading: jobs get 503
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.SNDHWM, HWM)
        self._sock.setsockopt(zmq.RCVHWM, HWM)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(address)
        self._jobs: dict[bytes, dict[bytes, asyncio.Task]] = {}  # front identity → request id → task
        self._metric_waits: dict[bytes, asyncio.Future] = {}
        self._ids = itertools.count()
        self._reader: asyncio.Task | None = None

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="switchboard-front-link")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        for jobs in self._jobs.values():
            for task in jobs.values():
                task.cancel()
        self._sock.close(0)
        self._ctx.term()

    def front_gone(self, identity: bytes) -> int:
        """Cancel every job a dead front had sent (its clients are gone with it); how many."""
        jobs = self._jobs.pop(identity, {})
        for task in jobs.values():
            task.cancel()
        return len(jobs)

    async def front_metrics(self, identities: list[bytes], timeout_s: float = 1.0) -> list[bytes]:
        """Each front's registry as Prometheus text (fronts that do not answer in time are left out)."""
        waits = []
        for identity in identities:
            rid = str(next(self._ids)).encode()
            future = asyncio.get_running_loop().create_future()
            self._metric_waits[rid] = future
            await self._sock.send_multipart([identity, b"metrics?", rid, b""])
            waits.append((rid, future))
        texts = []
        for rid, future in waits:
            try:
                texts.append(await asyncio.wait_for(future, timeout_s))
            except TimeoutError:
                log.warning("a front process did not send its metrics within %.1f s", timeout_s)
            finally:
                self._metric_waits.pop(rid, None)
        return texts

    async def _read(self) -> None:
        while True:
            try:
                identity, kind, rid, payload = await self._sock.recv_multipart(copy=False)
            except ValueError:
                continue  # not our framing
            except asyncio.CancelledError:
                raise
            identity, kind, rid = identity.bytes, kind.bytes, rid.bytes
            if kind == b"job":
                task = asyncio.get_running_loop().create_task(self._job(identity, rid, payload.buffer))
                self._jobs.setdefault(identity, {})[rid] = task
            elif kind == b"cancel":
                task = self._jobs.get(identity, {}).get(rid)
                if task is not None:
                    task.cancel()
            elif kind == b"auth":
                await self._reply_auth(identity, rid, payload.buffer)
            elif kind == b"hello":
                await self._reply_hello(identity, rid)
            elif kind == b"metrics":
                future = self._metric_waits.get(rid)
                if future is not None and not future.done():
                    future.set_result(payload.bytes)

    async def _job(self, identity: bytes, rid: bytes, payload: memoryview) -> None:
        try:
            serving = self._serving()
            if serving is None:
                raise NotReady("the backbone is still loading", {"Retry-After": "1"})
            job = _JOB.decode(payload)
            principal = await serving.authenticate(job.authorization, job.tenant_header)
            if principal.tenant != job.tenant or "classify" not in principal.scopes:
                raise Forbidden("this key may not classify for this tenant")
            answer = await serving.run(job)
            frames = [identity, b"answer", rid, _ENCODER.encode(answer)]
        except asyncio.CancelledError:
            return  # the client left (or its front died): nobody reads an answer
        except BaseException as exc:  # noqa: BLE001 - every failure goes back as an error frame
            error = _wire_error(exc)
            serving = self._serving()
            if error.status == 429 and serving is not None:
                error = msgspec.structs.replace(error, throttle_s=serving.throttle_window(job.tenant))
            frames = [identity, b"error", rid, _ENCODER.encode(error)]
        finally:
            jobs = self._jobs.get(identity)
            if jobs is not None:
                jobs.pop(rid, None)
        await self._sock.send_multipart(frames)

    async def _reply_auth(self, identity: bytes, rid: bytes, payload: memoryview) -> None:
        serving = self._serving()
        try:
            if serving is None:
                raise NotReady("the backbone is still loading", {"Retry-After": "1"})
            query = _AUTH.decode(payload)
            principal = await serving.authenticate(query.authorization, query.tenant_header)
            frames = [identity, b"auth", rid, _ENCODER.encode(WirePrincipal.of(principal))]
        except BaseException as exc:  # noqa: BLE001
            frames = [identity, b"error", rid, _ENCODER.encode(_wire_error(exc))]
        await self._sock.send_multipart(frames)

    async def _reply_hello(self, identity: bytes, rid: bytes) -> None:
        serving = self._serving()
        if serving is None:
            frames = [identity, b"error", rid, _ENCODER.encode(WireError(503, "not_ready", "still loading"))]
        else:
            frames = [identity, b"hello", rid, _ENCODER.encode(Hello(dataclasses.asdict(serving.spec),
                                                                       serving.open_mode, serving.embedding_dim))]
        await self._sock.send_multipart(frames)


class RemoteServing:
    """A front process's way to the scheduler: the same calls as `LocalServing`, over the link. Event loop
    only. Keys are cached for `auth_cache_s` (the scheduler checks each job's key again anyway)."""

    def __init__(self, address: str, index: int, metrics_text: Callable[[], bytes], auth_cache_s: float = 1.0,
                 answer_grace_s: float = 5.0) -> None:
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, f"front-{index}".encode())
        self._sock.setsockopt(zmq.SNDHWM, HWM)
        self._sock.setsockopt(zmq.RCVHWM, HWM)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)
        self._metrics_text = metrics_text
        self._waits: dict[bytes, asyncio.Future] = {}
        self._ids = itertools.count()
        self._auth: TTLCache = TTLCache(maxsize=4096, ttl=auth_cache_s)
        self._throttled: dict[str, tuple[float, int]] = {}
        self._grace_s = answer_grace_s
        self._reader: asyncio.Task | None = None
        self.spec: BackboneSpec | None = None
        self.open_mode = False
        self.embedding_dim = 0

    async def connect(self, retry_s: float = 0.2) -> None:
        """Start reading and wait until the scheduler's runtime is ready (hello answered)."""
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="switchboard-scheduler-link")
        while True:
            try:
                hello = _HELLO.decode(await self._call(b"hello", b"", timeout_s=5.0))
                break
            except (ApiError, TimeoutError):
                await asyncio.sleep(retry_s)
        self.spec = BackboneSpec(**hello.spec)
        self.open_mode, self.embedding_dim = hello.open_mode, hello.embedding_dim

    @property
    def ready(self) -> bool:
        return self.spec is not None

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._sock.close(0)
        self._ctx.term()

    async def authenticate(self, authorization: str | None, tenant_header: str | None) -> Principal:
        key = hashlib.sha256(f"{authorization}\0{tenant_header}".encode("utf-8", "surrogateescape")).digest()
        cached = self._auth.get(key)
        if cached is None:
            try:
                cached = _PRINCIPAL.decode(await self._call(b"auth", _ENCODER.encode(
                    AuthQuery(authorization, tenant_header)), timeout_s=5.0)).principal()
            except ApiError as exc:  # a 401 is cached like a principal; anything else is not
                if exc.status != 401:
                    raise
                cached = exc
            except TimeoutError as exc:
                raise EngineUnavailable("the scheduler did not answer; retry the request") from exc
            self._auth[key] = cached
        if isinstance(cached, BaseException):
            raise cached
        return cached

    def throttle_window(self, tenant: str) -> float:
        """Seconds left in this tenant's throttle here (0: none); counts nothing."""
        until, _ = self._throttled.get(tenant, (0.0, 0))
        return max(0.0, until - asyncio.get_running_loop().time()) if until else 0.0

    def throttled(self, tenant: str) -> int | None:
        until, retry = self._throttled.get(tenant, (0.0, 0))
        if until and asyncio.get_running_loop().time() < until:
            return retry
        return None

    def precheck(self, tenant: str, rows: int, min_tokens: int) -> None:
        """The scheduler's admission decides (after tokenizing here); only this front's throttle applies."""

    async def run(self, job: Job) -> Answer:
        try:
            payload = await self._call(b"job", _ENCODER.encode(job), timeout_s=job.timeout_s + self._grace_s)
        except TimeoutError as exc:
            raise EngineUnavailable("the scheduler did not answer in time; retry the request") from exc
        except ApiError as exc:
            throttle_s = getattr(exc, "throttle_s", 0.0)
            if exc.status == 429 and throttle_s > 0:
                retry = int(exc.headers.get("Retry-After", "1"))
                self._throttled[job.tenant] = (asyncio.get_running_loop().time() + throttle_s, retry)
            raise
        return _ANSWER.decode(payload)

    async def _call(self, kind: bytes, payload: bytes, timeout_s: float) -> bytes:
        rid = str(next(self._ids)).encode()
        future = asyncio.get_running_loop().create_future()
        self._waits[rid] = future
        try:
            await self._sock.send_multipart([kind, rid, payload], copy=False)
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.CancelledError:
            if kind == b"job":  # the client left: the scheduler drops the rows
                await self._sock.send_multipart([b"cancel", rid, b""])
            raise
        finally:
            self._waits.pop(rid, None)

    async def _read(self) -> None:
        while True:
            kind, rid, payload = await self._sock.recv_multipart()
            if kind == b"metrics?":
                await self._sock.send_multipart([b"metrics", rid, self._metrics_text()])
                continue
            future = self._waits.get(rid)
            if future is None or future.done():
                continue
            if kind == b"error":
                wire = _ERROR.decode(payload)
                error = wire.error()
                error.throttle_s = wire.throttle_s  # type: ignore[attr-defined]
                future.set_exception(error)
            else:
                future.set_result(payload)
