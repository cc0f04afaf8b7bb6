"""The HTTP contract over real loopback HTTP: mixed batching, overload, errors, metrics. The app runs
in a thread of the test process (start-up in milliseconds); only graceful shutdown on SIGTERM needs
a separate `switchboard serve` process."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest
import torch

from switchboard.adapter_store.formats import native
from switchboard.server.core.engine import Engine
from tests.factories import KINDS, TEXTS, random_adapter, tiny_backbone
from tests.server_fixture import classify_concurrently, metric_samples, running_server, serving_in_thread, upload


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    with serving_in_thread(tmp_path_factory.mktemp("data"), tiny_dir[1], batch_wait_ms=30) as (url, _):
        yield url


@pytest.fixture(scope="module")
def adapters(tiny_dir):
    backbone = tiny_dir[1]
    return {f"task-{i}": random_adapter(backbone.spec, seed=100 + i, backbone_model=backbone.model, **kw)
            for i, kw in enumerate(KINDS)}


@pytest.fixture(scope="module")
def uploaded(server, adapters):
    fingerprint = httpx.get(f"{server}/v1/backbone").json()["fingerprint"]
    for task, adapter in adapters.items():
        r = upload(server, task, adapter, fingerprint)
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["task"] == task and body["version"] == 1 and body["kind"] == adapter.kind
        assert body["num_labels"] == adapter.num_labels and body["params"] == adapter.num_params
    return fingerprint


def test_health_backbone_and_metrics(server, tiny_dir):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    info = httpx.get(f"{server}/v1/backbone").json()
    spec = tiny_dir[1].spec
    assert info == {"name": info["name"], "model_type": "bert", "hidden_size": spec.hidden_size,
                    "num_layers": spec.num_layers, "intermediate_size": spec.intermediate_size,
                    "max_length": 128, "fingerprint": spec.fingerprint, "family": "bert"}
    samples = metric_samples(server)
    assert samples["switchboard_ready"] == 1.0
    if shutil.which("promtool"):
        import subprocess

        check = subprocess.run(["promtool", "check", "metrics"], input=httpx.get(f"{server}/metrics").text,
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_concurrent_mixed_requests_equal_requests_sent_alone(server, uploaded, adapters, tiny_dir):
    # oracle 1: the engine in-process, each request alone
    engine = Engine(tiny_backbone(seed=7))
    requests = [(task, [TEXTS[(i + j) % len(TEXTS)] for j in range(1 + i % 3)])
                for i, task in enumerate(list(adapters) * 3)]
    alone = {}
    for task, texts in requests:
        r = httpx.post(f"{server}/v1/classify", json={"task": task, "inputs": texts, "raw_scores": True})
        assert r.status_code == 200, r.text
        alone[(task, tuple(texts))] = r.json()
        slot = engine.load(adapters[task]).slot
        enc = engine.tokenize(texts)
        want = engine.forward(enc["input_ids"], enc["attention_mask"], torch.full((len(texts),), slot))
        for row, preds in enumerate(r.json()["predictions"]):
            assert len(preds) == adapters[task].num_labels
            for p in preds:
                index = adapters[task].labels.index(p["label"])
                assert abs(p["score"] - want[row, index].item()) <= 1e-4
        engine.unload(slot)
    before = metric_samples(server)

    responses = classify_concurrently(server, requests)
    for (task, texts), r in zip(requests, responses):
        assert r.status_code == 200, r.text
        got, want = r.json(), alone[(task, tuple(texts))]
        assert got["task"] == task and got["version"] == want["version"]
        for g_row, w_row in zip(got["predictions"], want["predictions"]):
            assert [p["label"] for p in g_row] == [p["label"] for p in w_row]
            assert max(abs(a["score"] - b["score"]) for a, b in zip(g_row, w_row)) <= 1e-4
    after = metric_samples(server)
    batches = after["switchboard_batches_total"] - before["switchboard_batches_total"]
    tasks_in_batches = after["switchboard_batch_tasks_sum"] - before["switchboard_batch_tasks_sum"]
    assert batches < len(requests), "concurrent requests should share forward passes"
    assert tasks_in_batches / batches > 1.5, "batches should mix tasks"


def test_scores_top_k_and_single_string(server, uploaded, adapters):
    task = "task-3"  # 5 labels
    r = httpx.post(f"{server}/v1/classify", json={"task": task, "inputs": "fonts"})
    preds = r.json()["predictions"]
    assert len(preds) == 1 and len(preds[0]) == 5
    scores = [p["score"] for p in preds[0]]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5
    raw = httpx.post(f"{server}/v1/classify", json={"task": task, "inputs": ["fonts"], "raw_scores": True,
                                                    "top_k": 2}).json()["predictions"][0]
    assert [p["label"] for p in raw] == [p["label"] for p in preds[0][:2]]
    logits = torch.tensor([p["score"] for p in raw])
    assert not torch.allclose(logits, torch.tensor(scores[:2]))  # logits, not probabilities


def test_errors_are_json_with_the_right_status(server, uploaded, adapters, tiny_dir):
    head_only = random_adapter(tiny_dir[1].spec, seed=1)
    head_only = head_only.without("ia3")  # a head on the bare backbone is not an adapter
    def err(r: httpx.Response, status: int, type_: str | None = None) -> None:
        assert r.status_code == status, r.text
        body = r.json()["error"]
        assert isinstance(body["message"], str) and body["message"]
        if type_:
            assert body["type"] == type_

    post = lambda body, **kw: httpx.post(f"{server}/v1/classify", json=body, **kw)  # noqa: E731
    err(post({"task": "nope", "inputs": "x"}), 404, "task_not_found")
    err(post({"inputs": "x"}), 422, "validation_error")
    err(post({"task": "task-0", "inputs": 5}), 422, "validation_error")
    err(post({"task": "task-0", "inputs": "x", "top_k": 0}), 422, "validation_error")
    err(post({"task": "task-0", "inputs": []}), 422)
    err(post({"task": "task-0", "inputs": ["x"] * 65}), 413, "payload_too_large")
    err(post({"task": "task-0", "inputs": ["x" * 2_000_000]}), 413, "payload_too_large")
    err(httpx.post(f"{server}/v1/classify", content=b"{not json", headers={"content-type": "application/json"}), 422)

    def chunked():  # no Content-Length: the limit is enforced while streaming
        yield b'{"task": "task-0", "inputs": ["'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"]}'

    err(httpx.post(f"{server}/v1/classify", content=chunked(), headers={"content-type": "application/json"}),
        413, "payload_too_large")
    err(httpx.get(f"{server}/v1/tasks/nope"), 404, "task_not_found")
    err(httpx.delete(f"{server}/v1/tasks/nope"), 404, "task_not_found")
    err(httpx.get(f"{server}/v1/nothing-here"), 404)
    err(httpx.put(f"{server}/v1/tasks/bad name!", files=[("files", ("a.safetensors", b"x"))]), 422)
    tasks_before = httpx.get(f"{server}/v1/tasks").json()
    for files in ([("files", ("adapter_model.bin", b"\x80\x04K\x01."))],
                  [("files", ("adapter.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}"))],
                  [("files", ("adapter.safetensors", b""))],
                  [("files", ("adapter_config.json", b"{\"peft_type\": \"LORA\"}")),
                   ("files", ("adapter_model.safetensors", b"x"))],
                  [("files", ("adapter_config.json", b"{\"peft_type\": \"IA3\", \"feedforward_modules\": \"(\"}")),
                   ("files", ("adapter_model.safetensors", b"x"))],
                  [("files", ("adapter_config.json", b"[" * 100_000)),
                   ("files", ("adapter_model.safetensors", b"x"))],
                  [("files", ("adapter.safetensors", native.dumps(head_only, uploaded)))],
                  [("files", ("../adapter.safetensors", native.dumps(adapters["task-0"], uploaded)))]):
        err(httpx.put(f"{server}/v1/tasks/task-0", files=files), 422, "invalid_adapter")
    assert httpx.get(f"{server}/v1/tasks").json() == tasks_before  # nothing changed


def test_reupload_serves_the_new_version_and_delete_removes(server, uploaded, adapters, tiny_dir):
    spec = tiny_dir[1].spec
    old = httpx.post(f"{server}/v1/classify", json={"task": "task-0", "inputs": "fonts", "raw_scores": True}).json()
    replacement = random_adapter(spec, seed=999, kind="houlsby", width=8)
    r = upload(server, "task-0", replacement, uploaded)
    assert r.status_code == 201 and r.json()["version"] == 2
    new = httpx.post(f"{server}/v1/classify", json={"task": "task-0", "inputs": "fonts", "raw_scores": True}).json()
    assert new["version"] == 2 and new["predictions"] != old["predictions"]
    summary = httpx.get(f"{server}/v1/tasks/task-0").json()
    assert summary["version"] == 2 and [v["version"] for v in summary["versions"]] == [1, 2]
    assert httpx.delete(f"{server}/v1/tasks/task-9").status_code == 204
    assert httpx.post(f"{server}/v1/classify", json={"task": "task-9", "inputs": "x"}).status_code == 404
    assert "task-9" not in [t["task"] for t in httpx.get(f"{server}/v1/tasks").json()["tasks"]]
    # version numbers of a name never repeat, across a delete too
    again = upload(server, "task-9", adapters["task-9"], uploaded)
    assert again.status_code == 201 and again.json()["version"] == 2


def test_overload_answers_429_and_nothing_else_breaks(tiny_dir, tmp_path, adapters):
    with serving_in_thread(tmp_path, tiny_dir[1], max_queue_rows=8, max_batch_rows=4) as (url, _):
        fingerprint = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
        assert upload(url, "t", adapters["task-1"], fingerprint).status_code == 201
        alone = httpx.post(f"{url}/v1/classify", json={"task": "t", "inputs": TEXTS[:4], "raw_scores": True}).json()

        responses = classify_concurrently(url, [("t", TEXTS[:4])] * 40)
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "overloaded"
            else:
                assert r.json() == alone
        assert httpx.post(f"{url}/v1/classify", json={"task": "t", "inputs": TEXTS[:4], "raw_scores": True}).json() == alone
        assert metric_samples(url)['switchboard_dropped_requests_total{"reason": "queue_full"}'] >= 1


def test_disconnected_and_late_requests_are_dropped_and_shutdown_drains(tiny_dir, tmp_path, adapters):
    env = {"SWITCHBOARD_BATCH_WAIT_MS": "600"}  # the worker collects for 0.6 s: time to leave
    with running_server(tiny_dir[0], tmp_path, env=env) as (url, proc):
        fingerprint = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
        assert upload(url, "t", adapters["task-2"], fingerprint).status_code == 201
        body = {"task": "t", "inputs": ["fonts"]}
        httpx.post(f"{url}/v1/classify", json=body)  # warm up
        before = metric_samples(url)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/classify", json=body, timeout=0.15)  # the client leaves
        import time

        time.sleep(1.0)
        after = metric_samples(url)
        gone = 'switchboard_dropped_requests_total{"reason": "client_gone"}'
        assert after.get(gone, 0) - before.get(gone, 0) == 1
        assert after["switchboard_batches_total"] == before["switchboard_batches_total"]  # never computed

        # graceful shutdown: admitted requests still get their answers
        async def fire_then_stop():
            async with httpx.AsyncClient(timeout=30) as client:
                calls = [asyncio.ensure_future(client.post(f"{url}/v1/classify", json=body)) for _ in range(8)]
                await asyncio.sleep(0.3)  # admitted, waiting in the batcher
                proc.terminate()
                return await asyncio.gather(*calls)

        responses = asyncio.run(fire_then_stop())
        assert [r.status_code for r in responses] == [200] * 8
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown
        assert proc.wait(30) in (0, -15)


def test_requests_past_their_deadline_get_503(tiny_dir, tmp_path, adapters):
    with serving_in_thread(tmp_path, tiny_dir[1], batch_wait_ms=500, request_timeout_s=0.1) as (url, _):
        fingerprint = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
        assert upload(url, "t", adapters["task-2"], fingerprint).status_code == 201
        r = httpx.post(f"{url}/v1/classify", json={"task": "t", "inputs": ["fonts"]}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "deadline_exceeded"
        assert metric_samples(url)['switchboard_dropped_requests_total{"reason": "deadline"}'] == 1
