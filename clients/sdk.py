"""Typed Python client for the Switchboard HTTP API (sync `Client` and async `AsyncClient`, httpx).

    from switchboard.clients import Client
    with Client("http://127.0.0.1:8000") as sb:
        sb.upload("sections", "my-adapter/")
        result = sb.classify("sections", ["a chess engine"], top_k=2)
        print(result.version, result.predictions[0][0].label)

Server errors become typed exceptions (`TaskNotFound`, `InvalidAdapter`, `Overloaded`, …) built from the
server's `{"error": {"type", "message"}}` body.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
UPLOAD_SUFFIXES = (".json", ".safetensors")


class SwitchboardError(Exception):
    def __init__(self, status: int, type_: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {type_}: {message}")
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


_BY_TYPE: dict[str, type[SwitchboardError]] = {
    "task_not_found": TaskNotFound, "version_not_found": VersionNotFound, "invalid_request": InvalidRequest,
    "validation_error": InvalidRequest, "invalid_adapter": InvalidAdapter, "payload_too_large": PayloadTooLarge,
    "overloaded": Overloaded, "not_ready": Unavailable, "deadline_exceeded": Unavailable,
    "insufficient_capacity": InsufficientCapacity, "job_not_found": JobNotFound, "unauthorized": Unauthorized,
    "forbidden": Forbidden, "quota_exceeded": QuotaExceeded, "key_not_found": KeyNotFound,
    "tenant_not_found": TenantNotFound, "unknown_field": InvalidRequest, "invalid_json": InvalidRequest,
    "unsupported_media_type": InvalidRequest, "engine_unavailable": Unavailable, "store_unavailable": Unavailable,
    "canary_failed": CanaryFailed,
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


def _train_body(examples: Iterable[tuple[str, str]], eval_examples: Iterable[tuple[str, str]] | None,
                options: dict) -> dict:
    body = {"examples": [{"text": t, "label": label} for t, label in examples], **options}
    if eval_examples is not None:
        body["eval_examples"] = [{"text": t, "label": label} for t, label in eval_examples]
    return body


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


def _classify_body(task: str, inputs: str | list[str], raw_scores: bool, top_k: int | None) -> dict:
    return {"task": task, "inputs": inputs, "raw_scores": raw_scores, "top_k": top_k}


def _classify_result(data: dict) -> ClassifyResult:
    return ClassifyResult(data["task"], data["version"],
                          [[Prediction(p["label"], p["score"]) for p in row] for row in data["predictions"]])


def _fanout_body(tasks: list[str], inputs: str | list[str], raw_scores: bool, top_k: int | None) -> dict:
    return {"tasks": list(tasks), "inputs": inputs, "raw_scores": raw_scores, "top_k": top_k}


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
                 tenant: str | None = None, **httpx_kwargs) -> None:
        """api_key: a tenant key or the admin key (default: SWITCHBOARD_API_KEY); tenant: the tenant the
        admin key acts for (X-Switchboard-Tenant)."""
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=_headers(api_key, tenant),
                                  **httpx_kwargs)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def health(self) -> bool:
        return self._http.get("/health").status_code == 200

    def backbone(self) -> dict:
        return _raise_for(self._http.get("/v1/backbone")).json()

    def metrics(self) -> str:
        return _raise_for(self._http.get("/metrics")).text

    def classify(self, task: str, inputs: str | list[str], raw_scores: bool = False,
                 top_k: int | None = None) -> ClassifyResult:
        r = self._http.post("/v1/classify", json=_classify_body(task, inputs, raw_scores, top_k),
                                   headers=_affinity(task))
        return _classify_result(_raise_for(r).json())

    def classify_many(self, tasks: list[str], inputs: str | list[str], raw_scores: bool = False,
                      top_k: int | None = None) -> list[ClassifyResult]:
        """Every input under each task, computed in one mixed batch (fan-out); results in `tasks` order."""
        r = self._http.post("/v1/classify", json=_fanout_body(tasks, inputs, raw_scores, top_k))
        return [_classify_result(x) for x in _raise_for(r).json()["results"]]

    def embed(self, inputs: str | list[str], normalize: bool = True) -> list[list[float]]:
        """The backbone's mean-pooled embeddings (unit length unless normalize=False)."""
        r = self._http.post("/v1/embed", json={"inputs": inputs, "normalize": normalize})
        return _raise_for(r).json()["embeddings"]

    def upload(self, task: str, *paths: str | Path, labels: list[str] | None = None,
               canary: Iterable[tuple[str, str]] | None = None) -> TaskVersion:
        files, data = _upload_parts(list(paths), labels, canary)
        r = self._http.put(f"/v1/tasks/{task}", files=files, data=data, headers=_affinity(task))
        return TaskVersion(**_raise_for(r).json())

    def tasks(self) -> list[Task]:
        return [_task(t) for t in _raise_for(self._http.get("/v1/tasks")).json()["tasks"]]

    def task(self, task: str) -> Task:
        return _task(_raise_for(self._http.get(f"/v1/tasks/{task}", headers=_affinity(task))).json())

    def rollback(self, task: str, version: int) -> TaskVersion:
        r = self._http.post(f"/v1/tasks/{task}/rollback", json={"version": version}, headers=_affinity(task))
        return TaskVersion(**_raise_for(r).json())

    def delete(self, task: str) -> None:
        _raise_for(self._http.delete(f"/v1/tasks/{task}", headers=_affinity(task)))

    def train(self, task: str, examples: Iterable[tuple[str, str]],
              eval_examples: Iterable[tuple[str, str]] | None = None, **options: object) -> Job:
        """Start a few-shot (IA)3 job on the server (options: steps, batch_size, lr, seed)."""
        r = self._http.post(f"/v1/tasks/{task}/train", json=_train_body(examples, eval_examples, options),
                            headers=_affinity(task))
        return Job(**_raise_for(r).json())

    def job(self, job_id: str) -> Job:
        return Job(**_raise_for(self._http.get(f"/v1/jobs/{job_id}")).json())

    def jobs(self) -> list[Job]:
        return [Job(**j) for j in _raise_for(self._http.get("/v1/jobs")).json()["jobs"]]

    def cancel_job(self, job_id: str) -> Job:
        return Job(**_raise_for(self._http.delete(f"/v1/jobs/{job_id}")).json())

    # ----- admin (the admin key) -------------------------------------------------------------------
    def create_key(self, tenant: str, scopes: Iterable[str] = ("classify",), name: str | None = None,
                   expires_at: str | None = None) -> ApiKey:
        """A new key for `tenant`; its secret is in the answer's `key`, this once."""
        r = self._http.post("/v1/keys", json=_key_body(tenant, scopes, name, expires_at))
        return ApiKey(**_raise_for(r).json())

    def keys(self) -> list[ApiKey]:
        return [ApiKey(**k) for k in _raise_for(self._http.get("/v1/keys")).json()["keys"]]

    def revoke_key(self, key_id: str) -> None:
        _raise_for(self._http.delete(f"/v1/keys/{key_id}"))

    def put_tenant(self, tenant: str, **quota: int | None) -> dict:
        """Quota overrides: max_tasks, max_adapter_bytes, max_queued_rows (None: the default)."""
        return _raise_for(self._http.put(f"/v1/tenants/{tenant}", json=quota)).json()

    def tenant(self, tenant: str) -> dict:
        return _raise_for(self._http.get(f"/v1/tenants/{tenant}")).json()

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
    def __init__(self, base_url: str = DEFAULT_URL, timeout: float = 60.0, api_key: str | None = None,
                 tenant: str | None = None, **httpx_kwargs) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=_headers(api_key, tenant),
                                       **httpx_kwargs)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def health(self) -> bool:
        return (await self._http.get("/health")).status_code == 200

    async def backbone(self) -> dict:
        return _raise_for(await self._http.get("/v1/backbone")).json()

    async def metrics(self) -> str:
        return _raise_for(await self._http.get("/metrics")).text

    async def classify(self, task: str, inputs: str | list[str], raw_scores: bool = False,
                       top_k: int | None = None) -> ClassifyResult:
        r = await self._http.post("/v1/classify", json=_classify_body(task, inputs, raw_scores, top_k),
                                   headers=_affinity(task))
        return _classify_result(_raise_for(r).json())

    async def classify_many(self, tasks: list[str], inputs: str | list[str], raw_scores: bool = False,
                            top_k: int | None = None) -> list[ClassifyResult]:
        r = await self._http.post("/v1/classify", json=_fanout_body(tasks, inputs, raw_scores, top_k))
        return [_classify_result(x) for x in _raise_for(r).json()["results"]]

    async def embed(self, inputs: str | list[str], normalize: bool = True) -> list[list[float]]:
        r = await self._http.post("/v1/embed", json={"inputs": inputs, "normalize": normalize})
        return _raise_for(r).json()["embeddings"]

    async def upload(self, task: str, *paths: str | Path, labels: list[str] | None = None,
                     canary: Iterable[tuple[str, str]] | None = None) -> TaskVersion:
        files, data = _upload_parts(list(paths), labels, canary)
        r = await self._http.put(f"/v1/tasks/{task}", files=files, data=data, headers=_affinity(task))
        return TaskVersion(**_raise_for(r).json())

    async def tasks(self) -> list[Task]:
        return [_task(t) for t in _raise_for(await self._http.get("/v1/tasks")).json()["tasks"]]

    async def task(self, task: str) -> Task:
        return _task(_raise_for(await self._http.get(f"/v1/tasks/{task}", headers=_affinity(task))).json())

    async def rollback(self, task: str, version: int) -> TaskVersion:
        r = await self._http.post(f"/v1/tasks/{task}/rollback", json={"version": version}, headers=_affinity(task))
        return TaskVersion(**_raise_for(r).json())

    async def delete(self, task: str) -> None:
        _raise_for(await self._http.delete(f"/v1/tasks/{task}", headers=_affinity(task)))

    async def train(self, task: str, examples: Iterable[tuple[str, str]],
                    eval_examples: Iterable[tuple[str, str]] | None = None, **options: object) -> Job:
        r = await self._http.post(f"/v1/tasks/{task}/train", json=_train_body(examples, eval_examples, options),
                            headers=_affinity(task))
        return Job(**_raise_for(r).json())

    async def job(self, job_id: str) -> Job:
        return Job(**_raise_for(await self._http.get(f"/v1/jobs/{job_id}")).json())

    async def jobs(self) -> list[Job]:
        return [Job(**j) for j in _raise_for(await self._http.get("/v1/jobs")).json()["jobs"]]

    async def cancel_job(self, job_id: str) -> Job:
        return Job(**_raise_for(await self._http.delete(f"/v1/jobs/{job_id}")).json())

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
        r = await self._http.post("/v1/keys", json=_key_body(tenant, scopes, name, expires_at))
        return ApiKey(**_raise_for(r).json())

    async def keys(self) -> list[ApiKey]:
        return [ApiKey(**k) for k in _raise_for(await self._http.get("/v1/keys")).json()["keys"]]

    async def revoke_key(self, key_id: str) -> None:
        _raise_for(await self._http.delete(f"/v1/keys/{key_id}"))

    async def put_tenant(self, tenant: str, **quota: int | None) -> dict:
        return _raise_for(await self._http.put(f"/v1/tenants/{tenant}", json=quota)).json()

    async def tenant(self, tenant: str) -> dict:
        return _raise_for(await self._http.get(f"/v1/tenants/{tenant}")).json()
