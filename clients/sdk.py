"""Typed Python client for the Switchboard HTTP API (sync `Client` and async `AsyncClient`, httpx).

    from clients.sdk import Client
    with Client("http://127.0.0.1:8000") as sb:
        sb.upload("sections", "my-adapter/")
        result = sb.classify("sections", ["a chess engine"], top_k=2)
        print(result.version, result.predictions[0][0].label)

Server errors become typed exceptions (`TaskNotFound`, `InvalidAdapter`, `Overloaded`, …) built from the
server's `{"error": {"type", "message"}}` body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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


_BY_TYPE: dict[str, type[SwitchboardError]] = {
    "task_not_found": TaskNotFound, "version_not_found": VersionNotFound, "invalid_request": InvalidRequest,
    "validation_error": InvalidRequest, "invalid_adapter": InvalidAdapter, "payload_too_large": PayloadTooLarge,
    "overloaded": Overloaded, "not_ready": Unavailable, "deadline_exceeded": Unavailable,
    "insufficient_capacity": InsufficientCapacity,
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


def _task(data: dict) -> Task:
    versions = [TaskVersion(**v) for v in data.pop("versions", [])]
    return Task(**data, versions=versions)


def _upload_parts(paths: list[str | Path], labels: list[str] | None) -> tuple[list, dict | None]:
    """A directory uploads its .json and .safetensors files (never pickles); files are sent as named."""
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(x for x in p.iterdir() if x.is_file() and x.suffix in UPLOAD_SUFFIXES)
                     if p.is_dir() else [p])
    parts = [("files", (f.name, f.read_bytes())) for f in files]
    return parts, ({"labels": json.dumps(labels)} if labels else None)


class Client:
    def __init__(self, base_url: str = DEFAULT_URL, timeout: float = 60.0, **httpx_kwargs) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout, **httpx_kwargs)

    def __enter__(self) -> "Client":
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
        r = self._http.post("/v1/classify", json=_classify_body(task, inputs, raw_scores, top_k))
        return _classify_result(_raise_for(r).json())

    def upload(self, task: str, *paths: str | Path, labels: list[str] | None = None) -> TaskVersion:
        files, data = _upload_parts(list(paths), labels)
        return TaskVersion(**_raise_for(self._http.put(f"/v1/tasks/{task}", files=files, data=data)).json())

    def tasks(self) -> list[Task]:
        return [_task(t) for t in _raise_for(self._http.get("/v1/tasks")).json()["tasks"]]

    def task(self, task: str) -> Task:
        return _task(_raise_for(self._http.get(f"/v1/tasks/{task}")).json())

    def rollback(self, task: str, version: int) -> TaskVersion:
        r = self._http.post(f"/v1/tasks/{task}/rollback", json={"version": version})
        return TaskVersion(**_raise_for(r).json())

    def delete(self, task: str) -> None:
        _raise_for(self._http.delete(f"/v1/tasks/{task}"))


class AsyncClient:
    def __init__(self, base_url: str = DEFAULT_URL, timeout: float = 60.0, **httpx_kwargs) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, **httpx_kwargs)

    async def __aenter__(self) -> "AsyncClient":
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
        r = await self._http.post("/v1/classify", json=_classify_body(task, inputs, raw_scores, top_k))
        return _classify_result(_raise_for(r).json())

    async def upload(self, task: str, *paths: str | Path, labels: list[str] | None = None) -> TaskVersion:
        files, data = _upload_parts(list(paths), labels)
        r = await self._http.put(f"/v1/tasks/{task}", files=files, data=data)
        return TaskVersion(**_raise_for(r).json())

    async def tasks(self) -> list[Task]:
        return [_task(t) for t in _raise_for(await self._http.get("/v1/tasks")).json()["tasks"]]

    async def task(self, task: str) -> Task:
        return _task(_raise_for(await self._http.get(f"/v1/tasks/{task}")).json())

    async def rollback(self, task: str, version: int) -> TaskVersion:
        r = await self._http.post(f"/v1/tasks/{task}/rollback", json={"version": version})
        return TaskVersion(**_raise_for(r).json())

    async def delete(self, task: str) -> None:
        _raise_for(await self._http.delete(f"/v1/tasks/{task}"))
