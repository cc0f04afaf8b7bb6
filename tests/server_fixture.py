"""Test helpers around a real `switchboard serve`: upload a native adapter, read /metrics."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from switchboard.adapter_store.formats import native
from switchboard.clients.local_server import free_port, running_process
from switchboard.clients.local_server import running_server as _running_server

ROOT = Path(__file__).resolve().parent.parent
__all__ = ["ROOT", "free_port", "metric_samples", "running_process", "running_server", "upload"]


def running_server(model_dir: Path | None, data_dir: Path, env: dict[str, str] | None = None,
                   extra_args: list[str] | None = None):
    """`switchboard serve` on a free port; yields (url, process)."""
    return _running_server(data_dir, model_dir, env, extra_args)


def upload(url: str, task: str, adapter, fingerprint: str) -> httpx.Response:
    blob = native.dumps(adapter, fingerprint)
    return httpx.put(f"{url}/v1/tasks/{task}", files=[("files", ("adapter.safetensors", blob))], timeout=30)


def metric_samples(url: str) -> dict[str, float]:
    """/metrics parsed with prometheus-client's own parser; every family must be switchboard_*."""
    text = httpx.get(f"{url}/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("switchboard_"), family.name
        for sample in family.samples:
            key = sample.name + (json.dumps(sample.labels, sort_keys=True) if sample.labels else "")
            out[key] = sample.value
    return out
