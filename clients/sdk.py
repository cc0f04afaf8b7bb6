"""Typed Python client for the Switchboard HTTP API (sync `Client` and async `AsyncClient`, httpx).

    from switchboard.clients import Client
    with Client("http://127.0.0.1:8000") as sb:
        sb.upload("sections", "my-adapter/")
        result = sb.classify("sections", ["a chess engine"], top_k=2)
        print(result.version, result.predictions[0][0].label)

Server errors become typed exceptions (`TaskNotFound`, `InvalidAdapter`, `Overloaded`, …) built from the
server's `{"error": {"type", "message"}}` body; a server that cannot be reached is `ServerUnreachable`
(`ServerTimeout` when it does not answer in time), never a raw httpx error.

Long input lists are split: `classify`, `classify_many` and `embed` send at most `max_batch` rows per
request (default 64, the server's default `max_inputs_per_request`; with fan-out, texts × tasks) and
return one result in the original order. Give a server started with a lower limit its `max_batch`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_MAX_BATCH = 64  # the server's default max_inputs_per_request
UPLOAD_SUFFIXES = (".json", ".safetensors")
# DESIGN.md §3 (the server's schemas.TASK_NAME; the SDK must not import the server)
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SwitchboardError(Exception):
    """Every error of the SDK. `status` is the HTTP status, 0 for errors raised before any answer."""

    def __init__(self, status: int, type_: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {type_}: {message}" if status else message)
        self.status, self.type, self.message, self.retry_after = status, type_, message, retry_after


class TaskNotFound(SwitchboardError): ...
class VersionNotFound(SwitchboardError): ...
class InvalidRequest(SwitchboardError): ...
class InvalidAdapter(SwitchboardError): ...
class PayloadTooLarge(SwitchboardError): ...
class Overloaded(SwitchboardError): ...
class Unavailable(SwitchboardError): ...
class InsufficientCapacity(SwitchboardError): ...
class ServerError(SwitchboardError): ...
class JobNotFound(SwitchboardError): ...
class Unauthorized(SwitchboardError): ...
class Forbidden(SwitchboardError): ...
class QuotaExceeded(SwitchboardError): ...
class KeyNotFound(SwitchboardError): ...
class TenantNotFound(SwitchboardError): ...
class CanaryFailed(SwitchboardError): ...


class ServerUnreachable(SwitchboardError):
    """No answer: nothing listens at the URL, the connection broke, or (`ServerTimeout`) it took too long."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(0, "server_unreachable", message)
        self.url = url


class ServerTimeout(ServerUnreachable):
    def __init__(self, url: str, message: str) -> None:
        super().__init__(url, message)
        self.type = "server_timeout"


class InvalidTaskName(SwitchboardError, ValueError):
    """Refused before sending: a '/' or a space would change the URL (a confusing 404), not name a task."""

    def __init__(self, name: str) -> None:
        super().__init__(0, "invalid_task_name",
                         f"invalid task name {name!r}: a task name has 1 to 64 characters, letters, digits, '.', "
                         "'_' and '-', and starts with a letter or digit (no '/', spaces or other characters)")
        self.name = name


class VersionChanged(SwitchboardError):
    """A split request's parts were answered by different versions of the task, twice in a row."""


_BY_TYPE: dict[str, type[SwitchboardError]] = {
    "task_not_found": TaskNotFound, "version_not_found": VersionNotFound, "invalid_request": InvalidRequest,
    "validation_error": InvalidRequest, "invalid_adapter": InvalidAdapter, "payload_too_large": PayloadTooLarge,
    "overloaded": Overloaded, "not_ready": Unavailable, "deadline_exceeded": Unavailable,
    "insufficient_capacity": InsufficientCapacity, "job_not_found": JobNotFound, "unauthorized": Unauthorized,
    "forbidden": Forbidden, "quota_exceeded": QuotaExceeded, "key_not_found": KeyNotFound,
    "tenant_not_found": TenantNotFound, "unknown_field": InvalidRequest, "invalid_json": InvalidRequest,
    "unsupported_media_type": InvalidRequest, "engine_unavailable": Unavailable, "store_unavailable": Unavailable,
    "canary_failed": CanaryFailed, "not_a_rerank_task": InvalidRequest,
}


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


@dataclass(frozen=True)
class ClassifyResult:
    task: str
    version: int
    predictions: list[list[Prediction]]


@dataclass(frozen=True)
class Ranked:
    index: int  # the document's position in the request
    relevance_score: float
    document: str | None = None


@dataclass(frozen=True)
class RerankResult:
    task: str
    version: int
    results: list[Ranked]  # best first


@dataclass(frozen=True)
class TaskVersion:
    task: str
    version: int
    kind: str
    num_labels: int
    labels: list[str]
    params: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Task(TaskVersion):
    created_at: float = 0.0
    versions: list[TaskVersion] = field(default_factory=list)


@dataclass(frozen=True)
class Job:
    """A background training job; `result` holds the new version's summary plus its accuracy once done."""

    id: str
    task: str
    status: str
    step: int
    total_steps: int
    loss: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    result: dict | None
    error: str | None

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


class InvalidURL(SwitchboardError, ValueError):
    def __init__(self, url: str) -> None:
        super().__init__(0, "invalid_url", f"unsupported server URL {url!r}: write http://HOST:PORT (or https://), "
                                           f"e.g. {DEFAULT_URL}")


def _base(url: str) -> str:
    """`localhost:8000` means http://localhost:8000 (httpx would read `localhost` as the scheme); any scheme
    but http(s), or no host, is refused with what to write."""
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise InvalidURL(url) from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidURL(url)
    return url.rstrip("/")


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise InvalidTaskName(str(name))
    return name


Input = str | tuple[str, str]  # a text, or a pair (text, text_pair) for pair tasks


def _example(text: Input, label: str) -> dict:
    if isinstance(text, str):
        return {"text": text, "label": label}
    return {"text": text[0], "text_pair": text[1], "label": label}


def _train_body(examples: Iterable[tuple[Input, str]], eval_examples: Iterable[tuple[Input, str]] | None,
                options: dict) -> dict:
    body = {"examples": [_example(t, label) for t, label in examples], **options}
    if eval_examples is not None:
        body["eval_examples"] = [_example(t, label) for t, label in eval_examples]
    return body


def _rerank_body(task: str, query: str, documents: list[str], raw_scores: bool) -> dict:
    return {"task": task, "query": query, "documents": documents, "raw_scores": raw_scores}


def _rerank_merge(task: str, parts: list[tuple[int, dict]], documents: list[str], top_n: int | None,
                  return_documents: bool) -> RerankResult:
    """Parts answered separately (more documents than max_batch), merged and sorted again."""
    versions = {data["version"] for _, data in parts}
    if len(versions) > 1:
        raise VersionChanged(0, "version_changed", "the task's version changed while a split rerank was answered; "
                                                   "retry, or send at most max_batch documents")
    ranked = sorted((Ranked(offset + x["index"], x["relevance_score"],
                            documents[offset + x["index"]] if return_documents else None)
                     for offset, data in parts for x in data["results"]),
                    key=lambda r: -r.relevance_score)
    return RerankResult(task, versions.pop(), ranked[:top_n])


def _raise_for(response: httpx.Response) -> httpx.Response:
    if response.status_code < 400:
        return response
    try:
        error = response.json()["error"]
        type_, message = str(error["type"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        type_, message = "http_error", response.text[:500]
    retry = response.headers.get("retry-after")
    cls = _BY_TYPE.get(type_, ServerError if response.status_code >= 500 else SwitchboardError)
    raise cls(response.status_code, type_, message, float(retry) if retry else None)


def _unreachable(url: str, timeout: object, exc: httpx.TransportError) -> ServerUnreachable:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return ServerUnreachable(url, f"cannot reach the Switchboard server at {url} ({exc or type(exc).__name__})")
    if isinstance(exc, httpx.TimeoutException):
        within = f"{timeout:g} s" if isinstance(timeout, int | float) else f"its timeout ({timeout})"
        return ServerTimeout(url, f"the server at {url} did not answer within {within}")
    return ServerUnreachable(url, f"the connection to {url} failed: {exc or type(exc).__name__}")


def _classify_body(task: str, inputs: str | list[str], raw_scores: bool, top_k: int | None) -> dict:
    return {"task": task, "inputs": inputs, "raw_scores": raw_scores, "top_k": top_k}


def _classify_result(data: dict) -> ClassifyResult:
    return ClassifyResult(data["task"], data["version"],
                          [[Prediction(p["label"], p["score"]) for p in row] for row in data["predictions"]])


def _fanout_body(tasks: list[str], inputs: str | list[str], raw_scores: bool, top_k: int | None) -> dict:
    return {"tasks": list(tasks), "inputs": inputs, "raw_scores": raw_scores, "top_k": top_k}


def _parts(inputs: str | Sequence, rows_per_input: int, max_batch: int) -> list:
    """The inputs as the requests will carry them: as given if they fit in one request, else slices of
    at most max_batch rows (each input is `rows_per_input` rows: one per fan-out task)."""
    if isinstance(inputs, str) or len(inputs) * rows_per_input <= max_batch:
        return [inputs]
    size = max(1, max_batch // rows_per_input)
    items = list(inputs)
    return [items[i:i + size] for i in range(0, len(items), size)]


def _stale(answers: list[list[ClassifyResult]]) -> list[int]:
    """Parts answered by another version than the last part (a new version or rollback came in between)."""
    last = [r.version for r in answers[-1]]
    return [i for i, answer in enumerate(answers) if [r.version for r in answer] != last]


def _merge(answers: list[list[ClassifyResult]]) -> list[ClassifyResult]:
    """One result per task, the parts' predictions in input order."""
    if _stale(answers):
        raise VersionChanged(0, "version_changed", "the task's version changed while a split request was answered, "
                                                   "twice; retry, or send at most max_batch inputs")
    return [ClassifyResult(first.task, first.version, [row for answer in answers for row in answer[i].predictions])
            for i, first in enumerate(answers[0])]


def _task(data: dict) -> Task:
    versions = [TaskVersion(**v) for v in data.pop("versions", [])]
    return Task(**data, versions=versions)


def _upload_parts(paths: list[str | Path], labels: list[str] | None,
                  canary: Iterable[tuple[str, str]] | None = None) -> tuple[list, dict | None]:
    """A directory uploads its .json and .safetensors files (never pickles); files are sent as named.
    canary: (text, label) pairs the new version must classify as stated before it becomes current."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such file or directory: {p}")
        files.extend(sorted(x for x in p.iterdir() if x.is_file() and x.suffix in UPLOAD_SUFFIXES)
                     if p.is_dir() else [p])
    if not files:
        raise FileNotFoundError(f"no .json or .safetensors files in {', '.join(map(str, paths))}")
    parts = [("files", (f.name, f.read_bytes())) for f in files]
    data = {}
    if labels:
        data["labels"] = json.dumps(labels)
    if canary is not None:
        data["canary"] = json.dumps([{"text": t, "label": label} for t, label in canary])
    return parts, data or None


def _headers(api_key: str | None, tenant: str | None) -> dict[str, str]:
    """The key (argument, else SWITCHBOARD_API_KEY) and, for the admin key, the tenant to act for."""
    key = api_key if api_key is not None else os.environ.get("SWITCHBOARD_API_KEY")
    headers = {"User-Agent": f"switchboard-sdk/{_version()}"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if tenant:
        headers["X-Switchboard-Tenant"] = tenant
    return headers


def _affinity(task: str) -> dict[str, str]:
    """`X-Switchboard-Task`: a proxy hashing on it sends each task to the replica where it is resident."""
    return {"X-Switchboard-Task": task}


def _max_batch(value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"max_batch must be a positive integer, not {value!r}")
    return value


def _version() -> str:
    try:
        return version("switchboard")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant: str
    scopes: list[str]
    name: str | None
    created_at: str
    expires_at: str | None
    key: str | None = None  # the secret: only in create_key's answer


class Client:
    def __init__(self, base_url: str = DEFAULT_URL, timeout: float = 60.0, api_key: str | None = None,
                 tenant: str | None = None, max_batch: int = DEFAULT_MAX_BATCH, **httpx_kwargs) -> None:
        """api_key: a tenant key or the admin key (default: SWITCHBOARD_API_KEY); tenant: the tenant the
        admin key acts for (X-Switchboard-Tenant); max_batch: most rows per classify/embed request (the
        server's max_inputs_per_request), longer input lists are split."""
        self.url, self.max_batch, self._timeout = _base(base_url), _max_batch(max_batch), timeout
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=_headers(api_key, tenant),
                                  **httpx_kwargs)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        """The one place requests go out: transport failures become ServerUnreachable/ServerTimeout."""
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, self._timeout, exc) from exc

    def _call(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        return _raise_for(self._send(method, path, **kwargs))

    def health(self) -> bool:
        """True once the server is ready; False while it loads, or when nothing answers (poll loops need no try)."""
        try:
            return self._send("GET", "/health").status_code == 200
        except ServerUnreachable:
            return False

    def backbone(self) -> dict:
        return self._call("GET", "/v1/backbone").json()

    def metrics(self) -> str:
        return self._call("GET", "/metrics").text

    def _split(self, tasks: list[str], inputs: str | list[str], send) -> list[ClassifyResult]:  # noqa: ANN001
        parts = _parts(inputs, len(tasks), self.max_batch)
        answers = [send(part) for part in parts]
        for i in _stale(answers):  # a version switched between the parts: ask those again, once
            answers[i] = send(parts[i])
        return _merge(answers)

    def classify(self, task: str, inputs: str | list[Input], raw_scores: bool = False,
                 top_k: int | None = None) -> ClassifyResult:
        """Predictions for each input, in order; more than max_batch inputs go in several requests. An input
        may be a pair (text, text_pair) for a pair task."""
        check_task_name(task)
        return self._split([task], inputs, lambda part: [_classify_result(self._call(
            "POST", "/v1/classify", json=_classify_body(task, part, raw_scores, top_k), headers=_affinity(task)
        ).json())])[0]

    def classify_many(self, tasks: list[str], inputs: str | list[str], raw_scores: bool = False,
                      top_k: int | None = None) -> list[ClassifyResult]:
        """Every input under each task, computed in one mixed batch (fan-out); results in `tasks` order.
        Past max_batch rows (inputs × tasks) the inputs are split over several requests."""
        tasks = [check_task_name(t) for t in tasks]
        return self._split(tasks, inputs, lambda part: [_classify_result(x) for x in self._call(
            "POST", "/v1/classify", json=_fanout_body(tasks, part, raw_scores, top_k)).json()["results"]])

    def rerank(self, task: str, query: str, documents: list[str], top_n: int | None = None,
               return_documents: bool = False, raw_scores: bool = False) -> RerankResult:
        """Documents sorted by a pair task's relevance to the query, best first (`top_n`: the n best);
        more than max_batch documents go in several requests, merged here."""
        check_task_name(task)
        docs = list(documents)
        parts = [(i, self._call("POST", "/v1/rerank", json=_rerank_body(task, query, docs[i:i + self.max_batch],
                                                                          raw_scores), headers=_affinity(task)).json())
                 for i in range(0, max(1, len(docs)), self.max_batch)]  # none: the server's 422 says why
        return _rerank_merge(task, parts, docs, top_n, return_documents)

    def embed(self, inputs: str | list[str], normalize: bool = True) -> list[list[float]]:
        """The backbone's mean-pooled embeddings (unit length unless normalize=False), in input order."""
        return [vector for part in _parts(inputs, 1, self.max_batch)
                for vector in self._call("POST", "/v1/embed", json={"inputs": part, "normalize": normalize}
                                         ).json()["embeddings"]]

    def upload(self, task: str, *paths: str | Path, labels: list[str] | None = None,
               canary: Iterable[tuple[str, str]] | None = None) -> TaskVersion:
        check_task_name(task)
        files, data = _upload_parts(list(paths), labels, canary)
        r = self._call("PUT", f"/v1/tasks/{task}", files=files, data=data, headers=_affinity(task))
        return TaskVersion(**r.json())

    def tasks(self) -> list[Task]:
        return [_task(t) for t in self._call("GET", "/v1/tasks").json()["tasks"]]

    def task(self, task: str) -> Task:
        check_task_name(task)
        return _task(self._call("GET", f"/v1/tasks/{task}", headers=_affinity(task)).json())

    def rollback(self, task: str, version: int) -> TaskVersion:
        check_task_name(task)
        r = self._call("POST", f"/v1/tasks/{task}/rollback", json={"version": version}, headers=_affinity(task))
        return TaskVersion(**r.json())

    def delete(self, task: str) -> None:
        check_task_name(task)
        self._call("DELETE", f"/v1/tasks/{task}", headers=_affinity(task))

    def train(self, task: str, examples: Iterable[tuple[str, str]],
              eval_examples: Iterable[tuple[str, str]] | None = None, **options: object) -> Job:
        """Start a few-shot (IA)3 job on the server (options: steps, batch_size, lr, seed)."""
        check_task_name(task)
        r = self._call("POST", f"/v1/tasks/{task}/train", json=_train_body(examples, eval_examples, options),
                       headers=_affinity(task))
        return Job(**r.json())

    def job(self, job_id: str) -> Job:
        return Job(**self._call("GET", f"/v1/jobs/{job_id}").json())

    def jobs(self) -> list[Job]:
        return [Job(**j) for j in self._call("GET", "/v1/jobs").json()["jobs"]]

    def cancel_job(self, job_id: str) -> Job:
        return Job(**self._call("DELETE", f"/v1/jobs/{job_id}").json())

    # ----- admin (the admin key) -------------------------------------------------------------------
    def create_key(self, tenant: str, scopes: Iterable[str] = ("classify",), name: str | None = None,
                   expires_at: str | None = None) -> ApiKey:
        """A new key for `tenant`; its secret is in the answer's `key`, this once."""
        return ApiKey(**self._call("POST", "/v1/keys", json=_key_body(tenant, scopes, name, expires_at)).json())

    def keys(self) -> list[ApiKey]:
        return [ApiKey(**k) for k in self._call("GET", "/v1/keys").json()["keys"]]

    def revoke_key(self, key_id: str) -> None:
        self._call("DELETE", f"/v1/keys/{key_id}")

    def put_tenant(self, tenant: str, **quota: int | None) -> dict:
        """Quota overrides: max_tasks, max_adapter_bytes, max_queued_rows (None: the default)."""
        return self._call("PUT", f"/v1/tenants/{tenant}", json=quota).json()

    def tenant(self, tenant: str) -> dict:
        return self._call("GET", f"/v1/tenants/{tenant}").json()

    def wait_for_job(self, job_id: str, timeout: float = 3600.0, poll: float = 1.0) -> Job:
        deadline = time.monotonic() + timeout
        while not (job := self.job(job_id)).done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            time.sleep(poll)
        return job


def _key_body(tenant: str, scopes: Iterable[str], name: str | None, expires_at: str | None) -> dict:
    body: dict = {"tenant": tenant, "scopes": list(scopes)}
    if name is not None:
        body["name"] = name
    if expires_at is not None:
        body["expires_at"] = expires_at
    return body


class AsyncClient:
    """`Client`'s API with `await`; split requests go one after the other, as in `Client`."""

    def __init__(self, base_url: str = DEFAULT_URL, timeout: float = 60.0, api_key: str | None = None,
                 tenant: str | None = None, max_batch: int = DEFAULT_MAX_BATCH, **httpx_kwargs) -> None:
        self.url, self.max_batch, self._timeout = _base(base_url), _max_batch(max_batch), timeout
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=_headers(api_key, tenant),
                                       **httpx_kwargs)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, self._timeout, exc) from exc

    async def _call(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        return _raise_for(await self._send(method, path, **kwargs))

    async def health(self) -> bool:
        try:
            return (await self._send("GET", "/health")).status_code == 200
        except ServerUnreachable:
            return False

    async def backbone(self) -> dict:
        return (await self._call("GET", "/v1/backbone")).json()

    async def metrics(self) -> str:
        return (await self._call("GET", "/metrics")).text

    async def _split(self, tasks: list[str], inputs: str | list[str], send) -> list[ClassifyResult]:  # noqa: ANN001
        parts = _parts(inputs, len(tasks), self.max_batch)
        answers = [await send(part) for part in parts]
        for i in _stale(answers):
            answers[i] = await send(parts[i])
        return _merge(answers)

    async def classify(self, task: str, inputs: str | list[Input], raw_scores: bool = False,
                       top_k: int | None = None) -> ClassifyResult:
        check_task_name(task)

        async def send(part: str | list[str]) -> list[ClassifyResult]:
            r = await self._call("POST", "/v1/classify", json=_classify_body(task, part, raw_scores, top_k),
                                 headers=_affinity(task))
            return [_classify_result(r.json())]
        return (await self._split([task], inputs, send))[0]

    async def classify_many(self, tasks: list[str], inputs: str | list[str], raw_scores: bool = False,
                            top_k: int | None = None) -> list[ClassifyResult]:
        tasks = [check_task_name(t) for t in tasks]

        async def send(part: str | list[str]) -> list[ClassifyResult]:
            r = await self._call("POST", "/v1/classify", json=_fanout_body(tasks, part, raw_scores, top_k))
            return [_classify_result(x) for x in r.json()["results"]]
        return await self._split(tasks, inputs, send)

    async def rerank(self, task: str, query: str, documents: list[str], top_n: int | None = None,
                     return_documents: bool = False, raw_scores: bool = False) -> RerankResult:
        check_task_name(task)
        docs = list(documents)
        parts = []
        for i in range(0, max(1, len(docs)), self.max_batch):
            r = await self._call("POST", "/v1/rerank", json=_rerank_body(task, query, docs[i:i + self.max_batch],
                                                                          raw_scores), headers=_affinity(task))
            parts.append((i, r.json()))
        return _rerank_merge(task, parts, docs, top_n, return_documents)

    async def embed(self, inputs: str | list[str], normalize: bool = True) -> list[list[float]]:
        vectors: list[list[float]] = []
        for part in _parts(inputs, 1, self.max_batch):
            r = await self._call("POST", "/v1/embed", json={"inputs": part, "normalize": normalize})
            vectors += r.json()["embeddings"]
        return vectors

    async def upload(self, task: str, *paths: str | Path, labels: list[str] | None = None,
                     canary: Iterable[tuple[str, str]] | None = None) -> TaskVersion:
        check_task_name(task)
        files, data = _upload_parts(list(paths), labels, canary)
        r = await self._call("PUT", f"/v1/tasks/{task}", files=files, data=data, headers=_affinity(task))
        return TaskVersion(**r.json())

    async def tasks(self) -> list[Task]:
        return [_task(t) for t in (await self._call("GET", "/v1/tasks")).json()["tasks"]]

    async def task(self, task: str) -> Task:
        check_task_name(task)
        return _task((await self._call("GET", f"/v1/tasks/{task}", headers=_affinity(task))).json())

    async def rollback(self, task: str, version: int) -> TaskVersion:
        check_task_name(task)
        r = await self._call("POST", f"/v1/tasks/{task}/rollback", json={"version": version},
                             headers=_affinity(task))
        return TaskVersion(**r.json())

    async def delete(self, task: str) -> None:
        check_task_name(task)
        await self._call("DELETE", f"/v1/tasks/{task}", headers=_affinity(task))

    async def train(self, task: str, examples: Iterable[tuple[str, str]],
                    eval_examples: Iterable[tuple[str, str]] | None = None, **options: object) -> Job:
        check_task_name(task)
        r = await self._call("POST", f"/v1/tasks/{task}/train", json=_train_body(examples, eval_examples, options),
                             headers=_affinity(task))
        return Job(**r.json())

    async def job(self, job_id: str) -> Job:
        return Job(**(await self._call("GET", f"/v1/jobs/{job_id}")).json())

    async def jobs(self) -> list[Job]:
        return [Job(**j) for j in (await self._call("GET", "/v1/jobs")).json()["jobs"]]

    async def cancel_job(self, job_id: str) -> Job:
        return Job(**(await self._call("DELETE", f"/v1/jobs/{job_id}")).json())

    async def wait_for_job(self, job_id: str, timeout: float = 3600.0, poll: float = 1.0) -> Job:
        deadline = time.monotonic() + timeout
        while not (job := await self.job(job_id)).done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            await asyncio.sleep(poll)
        return job

    # ----- admin (the admin key) -------------------------------------------------------------------
    async def create_key(self, tenant: str, scopes: Iterable[str] = ("classify",), name: str | None = None,
                         expires_at: str | None = None) -> ApiKey:
        r = await self._call("POST", "/v1/keys", json=_key_body(tenant, scopes, name, expires_at))
        return ApiKey(**r.json())

    async def keys(self) -> list[ApiKey]:
        return [ApiKey(**k) for k in (await self._call("GET", "/v1/keys")).json()["keys"]]

    async def revoke_key(self, key_id: str) -> None:
        await self._call("DELETE", f"/v1/keys/{key_id}")

    async def put_tenant(self, tenant: str, **quota: int | None) -> dict:
        return (await self._call("PUT", f"/v1/tenants/{tenant}", json=quota)).json()

    async def tenant(self, tenant: str) -> dict:
        return (await self._call("GET", f"/v1/tenants/{tenant}")).json()
