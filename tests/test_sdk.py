"""The typed SDK and the CLI against a real server: every endpoint, sync and async, typed errors."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from switchboard.adapter_store.formats import native
from switchboard.clients import sdk
from switchboard.clients.cli import main
from tests.factories import TEXTS
from tests.server_fixture import free_port, serving_in_thread


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
        with sdk.Client(server, max_batch=100) as unsplit, pytest.raises(sdk.PayloadTooLarge):
            unsplit.classify("sdk-task", ["x"] * 100)  # past the server's 64: its 413 comes through
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


def _close(a: sdk.ClassifyResult, b: sdk.ClassifyResult) -> bool:
    """Same task, version and ranking; scores equal up to batching's float rounding."""
    return (a.task, a.version, len(a.predictions)) == (b.task, b.version, len(b.predictions)) and all(
        [p.label for p in x] == [q.label for q in y] and max(abs(p.score - q.score) for p, q in zip(x, y)) <= 1e-4
        for x, y in zip(a.predictions, b.predictions))


def test_long_input_lists_are_split_into_requests_the_server_allows(server, adapters, tmp_path):
    """The reported stumble: 150 texts were a 413. Now one result, in order, equal to each text alone."""
    texts = [f"{TEXTS[i % len(TEXTS)]} #{i}" for i in range(150)]
    with sdk.Client(server) as client:
        fp = client.backbone()["fingerprint"]
        for task, adapter in (("split-a", adapters["task-0"]), ("split-b", adapters["task-1"])):
            (tmp_path / f"{task}.safetensors").write_bytes(native.dumps(adapter, fp))
            client.upload(task, tmp_path / f"{task}.safetensors")
        whole = client.classify("split-a", texts, raw_scores=True)
        alone = [client.classify("split-a", t, raw_scores=True) for t in texts]
        assert len(whole.predictions) == 150
        assert _close(whole, sdk.ClassifyResult("split-a", alone[0].version, [a.predictions[0] for a in alone]))
        fan = client.classify_many(["split-a", "split-b"], texts, raw_scores=True)  # 300 rows: 64 per request
        assert [r.task for r in fan] == ["split-a", "split-b"] and _close(fan[0], whole)
        assert _close(fan[1], client.classify("split-b", texts, raw_scores=True))
        vectors = client.embed(texts)
        assert len(vectors) == 150
        for i in (0, 63, 64, 149):
            assert max(abs(a - b) for a, b in zip(vectors[i], client.embed(texts[i])[0])) <= 1e-4
    with sdk.Client(server, max_batch=7) as small:  # a smaller limit: more, smaller requests, same answer
        assert _close(small.classify("split-a", texts, raw_scores=True), whole)

    async def run():
        async with sdk.AsyncClient(server) as client:
            return (await client.classify("split-a", texts, raw_scores=True),
                    await client.classify_many(["split-a", "split-b"], texts, raw_scores=True),
                    await client.embed(texts))

    a_whole, a_fan, a_vectors = asyncio.run(run())
    assert _close(a_whole, whole) and _close(a_fan[1], fan[1]) and len(a_vectors) == 150
    with pytest.raises(ValueError, match="max_batch"):
        sdk.Client(server, max_batch=0)


def test_a_server_that_is_down_is_a_typed_error_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with sdk.Client(url) as client:
        with pytest.raises(sdk.ServerUnreachable) as down:
            client.tasks()
        assert not client.health()  # a poll loop needs no try
    assert isinstance(down.value, sdk.SwitchboardError) and down.value.url == url
    assert str(down.value).startswith(f"cannot reach the Switchboard server at {url}")

    async def run():
        async with sdk.AsyncClient(url) as client:
            assert not await client.health()
            await client.classify("t", "x")

    with pytest.raises(sdk.ServerUnreachable, match=url):
        asyncio.run(run())
    from switchboard.clients import ServerTimeout, ServerUnreachable  # exported from the package

    assert ServerUnreachable is sdk.ServerUnreachable
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        slow = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with sdk.Client(slow, timeout=0.3) as client, pytest.raises(ServerTimeout) as late:
            client.backbone()
    assert isinstance(late.value, sdk.ServerUnreachable) and slow in str(late.value)


def test_names_and_urls_are_checked_before_anything_is_sent(server):
    nowhere = f"http://127.0.0.1:{free_port()}"
    with sdk.Client(nowhere) as client:
        for call in (lambda: client.classify("a/b", "x"), lambda: client.upload("a b", "."),
                     lambda: client.classify_many(["ok", "x/y"], "x"), lambda: client.delete("../keys")):
            with pytest.raises(sdk.InvalidTaskName, match="letters, digits, '.', '_' and '-'"):
                call()  # refused here: not a ServerUnreachable
    port = server.rsplit(":", 1)[1]
    with sdk.Client(f"127.0.0.1:{port}") as client:  # no scheme: http:// is meant
        assert client.url == f"http://127.0.0.1:{port}" and client.health()
    with pytest.raises(sdk.InvalidURL, match="http://HOST:PORT"):
        sdk.Client(f"ftp://127.0.0.1:{port}")


def test_a_split_request_answered_by_two_versions_is_asked_again():
    """A new version (or a rollback) between the parts of a split request: the parts answered by the older
    one are asked again, so the one result has one version; if it keeps changing, VersionChanged."""
    sent: list[int] = []

    def server(version_of):  # noqa: ANN001, ANN202
        def handle(request):  # noqa: ANN001, ANN202
            inputs = json.loads(request.content)["inputs"]
            sent.append(len(inputs))
            version = version_of(len(sent))
            return httpx.Response(200, json={"task": "t", "version": version, "predictions": [
                [{"label": f"v{version}:{text}", "score": 1.0}] for text in inputs]})
        return httpx.MockTransport(handle)

    texts = [str(i) for i in range(10)]
    with sdk.Client("http://sb.test", max_batch=4, transport=server(lambda n: 1 if n == 1 else 2)) as client:
        result = client.classify("t", texts)
    assert sent == [4, 4, 2, 4] and result.version == 2  # the first part was asked again
    assert [row[0].label for row in result.predictions] == [f"v2:{t}" for t in texts]
    with sdk.Client("http://sb.test", max_batch=4, transport=server(lambda n: n)) as client:
        with pytest.raises(sdk.VersionChanged):
            client.classify("t", texts)
