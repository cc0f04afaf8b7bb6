"""The typed SDK and the CLI against a real server: every endpoint, sync and async, typed errors."""

from __future__ import annotations

import asyncio
import json

import pytest

from switchboard.adapter_store.formats import native
from switchboard.clients import sdk
from switchboard.clients.cli import main
from tests.factories import TEXTS
from tests.server_fixture import serving_in_thread


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    with serving_in_thread(tmp_path_factory.mktemp("data"), tiny_dir[1]) as (url, _):
        yield url


def test_sync_client_covers_every_endpoint(server, adapters, tmp_path):
    with sdk.Client(server) as client:
        assert client.health()
        fp = client.backbone()["fingerprint"]
        adapter_dir = tmp_path / "a"
        adapter_dir.mkdir()
        (adapter_dir / "adapter.safetensors").write_bytes(native.dumps(adapters["task-3"], fp))
        (adapter_dir / "notes.bin").write_bytes(b"never sent")  # directories upload only safetensors/json
        v1 = client.upload("sdk-task", adapter_dir)
        assert (v1.version, v1.kind, v1.num_labels) == (1, adapters["task-3"].kind, adapters["task-3"].num_labels)
        labels = [f"name{i}" for i in range(adapters["task-3"].num_labels)]
        v2 = client.upload("sdk-task", adapter_dir / "adapter.safetensors", labels=labels)
        assert v2.version == 2 and v2.labels == labels
        result = client.classify("sdk-task", TEXTS[:2], top_k=2)
        assert result.version == 2 and len(result.predictions) == 2
        assert all(len(row) == 2 and row[0].score >= row[1].score for row in result.predictions)
        assert {p.label for row in result.predictions for p in row} <= set(labels)
        assert client.rollback("sdk-task", 1).version == 1
        assert client.classify("sdk-task", "fonts").version == 1
        task = client.task("sdk-task")
        assert task.version == 1 and [v.version for v in task.versions] == [1, 2]
        assert "sdk-task" in [t.task for t in client.tasks()]
        assert "switchboard_requests_total" in client.metrics()
        with pytest.raises(sdk.VersionNotFound):
            client.rollback("sdk-task", 7)
        with pytest.raises(sdk.InvalidAdapter) as bad:
            client.upload("sdk-task", adapter_dir / "notes.bin")
        assert bad.value.status == 422 and "convert" in bad.value.message
        with pytest.raises(sdk.PayloadTooLarge):
            client.classify("sdk-task", ["x"] * 100)
        with pytest.raises(sdk.InvalidRequest):
            client.classify("sdk-task", "x", top_k=0)
        client.delete("sdk-task")
        with pytest.raises(sdk.TaskNotFound) as missing:
            client.classify("sdk-task", "x")
        assert missing.value.status == 404 and missing.value.type == "task_not_found"


def test_async_client_matches_the_sync_client(server, adapters):
    with sdk.Client(server) as client:
        fp = client.backbone()["fingerprint"]

    async def run():
        async with sdk.AsyncClient(server) as client:
            assert await client.health()
            files = {"adapter.safetensors": native.dumps(adapters["task-1"], fp)}
            import tempfile
            from pathlib import Path

            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "adapter.safetensors").write_bytes(files["adapter.safetensors"])
                await client.upload("async-task", d)
            results = await asyncio.gather(*[client.classify("async-task", t, raw_scores=True) for t in TEXTS[:4]])
            with pytest.raises(sdk.TaskNotFound):
                await client.classify("nope", "x")
            return results

    results = asyncio.run(run())
    with sdk.Client(server) as client:
        for text, r in zip(TEXTS[:4], results):  # batched together vs alone: equal up to float rounding
            alone = client.classify("async-task", text, raw_scores=True)
            assert (alone.task, alone.version) == (r.task, r.version)
            assert [p.label for p in alone.predictions[0]] == [p.label for p in r.predictions[0]]
            assert max(abs(a.score - b.score) for a, b in zip(alone.predictions[0], r.predictions[0])) <= 1e-4


def test_cli_upload_classify_tasks(server, adapters, tmp_path, capsys):
    with sdk.Client(server) as client:
        fp = client.backbone()["fingerprint"]
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(native.dumps(adapters["task-2"], fp))
    assert main(["upload", "cli-task", str(path), "--url", server, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "cli-task"
    assert main(["classify", "cli-task", "fonts", "mail", "--top-k", "1", "--url", server, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "cli-task" and len(out["predictions"]) == 2 and len(out["predictions"][0]) == 1
    assert main(["tasks", "--url", server, "--json"]) == 0
    assert "cli-task" in [t["task"] for t in json.loads(capsys.readouterr().out)["tasks"]]
    assert main(["classify", "missing", "x", "--url", server]) == 1
    err = capsys.readouterr().err
    assert "task_not_found" in err and "switchboard tasks" in err
