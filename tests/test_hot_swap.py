"""Uploads under fire: a corpus of bad uploads (each refused, nothing changes), hot swap under load
(every answer's version matches its logits), and RSS over upload/delete cycles."""

from __future__ import annotations

import json
import struct
import threading

import httpx
import psutil
import pytest
import torch

from switchboard.adapter_store.formats import native
from tests.factories import TEXTS, random_adapter
from tests.server_fixture import running_server, serving_in_thread, upload


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    with serving_in_thread(tmp_path_factory.mktemp("data"), tiny_dir[1], max_upload_bytes=4 << 20) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def server_process(tiny_dir, tmp_path_factory):
    """A separate process, so that its RSS is the server's own."""
    with running_server(tiny_dir[0], tmp_path_factory.mktemp("data")) as (url, proc):
        yield url, proc


def _huge_header() -> bytes:
    header = json.dumps({"head.out_w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]},
                         "__metadata__": {"format": "switchboard", "format_version": "1", "labels": "[]"}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 64


def test_bad_upload_corpus_is_refused_and_changes_nothing(server, tiny_dir, adapters):
    url, _ = server
    fp = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
    spec = tiny_dir[1].spec
    assert upload(url, "keep", adapters["task-0"], fp).status_code == 201
    good = native.dumps(adapters["task-1"], fp)
    nan = random_adapter(spec, seed=5)
    nan.parts["ia3"].vectors["k_out"][0, 0] = float("inf")
    wrong_shape = random_adapter(spec, seed=5)
    wrong_shape.parts["ia3"].vectors["k_out"] = wrong_shape.parts["ia3"].vectors["k_out"][:, :10]
    corpus = {
        "pickle": [("adapter_model.bin", b"\x80\x04\x95")],
        "truncated": [("adapter.safetensors", good[: len(good) // 2])],
        "garbage header": [("adapter.safetensors", b"\xff" * 64)],
        "huge header": [("adapter.safetensors", _huge_header())],
        "nan": [("adapter.safetensors", native.dumps(nan, fp))],
        "wrong shape": [("adapter.safetensors", native.dumps(wrong_shape, fp))],
        "wrong backbone": [("adapter.safetensors", native.dumps(adapters["task-1"], "sha256:" + "0" * 32))],
        "path name": [("../../etc/adapter.safetensors", good)],
        "empty": [("adapter.safetensors", b"")],
        "two weight files": [("a.safetensors", good), ("b.safetensors", good)],
        "unknown tensor": [("adapter.safetensors", _with_extra_tensor(adapters["task-1"], fp))],
    }
    before = httpx.get(f"{url}/v1/tasks").json()
    for name, files in corpus.items():
        for task in ("keep", "new-task"):
            r = httpx.put(f"{url}/v1/tasks/{task}", files=[("files", f) for f in files], timeout=30)
            assert r.status_code == 422, (name, r.status_code, r.text)
            assert r.json()["error"]["type"] == "invalid_adapter" and r.json()["error"]["message"], name
    too_big = httpx.put(f"{url}/v1/tasks/keep", files=[("files", ("adapter.safetensors", b"\0" * (5 << 20)))])
    assert too_big.status_code == 413
    assert httpx.get(f"{url}/v1/tasks").json() == before


def _with_extra_tensor(adapter, fp: str) -> bytes:
    from safetensors.torch import load, save

    data = native.dumps(adapter, fp)
    meta = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    tensors = load(data)
    tensors["ia3.q_out"] = torch.ones(3)
    return save(tensors, metadata=meta)


def test_hot_swap_under_load_every_answer_matches_its_version(server, tiny_dir, adapters):
    url, _ = server
    fp = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
    weights = [adapters["task-0"], adapters["task-8"]]  # same label count, different logits
    body = {"task": "swap", "inputs": TEXTS[:2], "raw_scores": True}

    def scores(answer: dict) -> list[list[float]]:
        return [[p["score"] for p in sorted(row, key=lambda p: p["label"])] for row in answer["predictions"]]

    expected_by_weights = []
    for w in weights:
        assert upload(url, "probe", w, fp).status_code == 201
        expected_by_weights.append(scores(httpx.post(f"{url}/v1/classify", json={**body, "task": "probe"}).json()))
    version_weights: dict[int, int] = {}
    r = upload(url, "swap", weights[0], fp)
    version_weights[r.json()["version"]] = 0
    answers: list[dict] = []
    errors: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                resp = client.post(f"{url}/v1/classify", json=body)
                if resp.status_code != 200:
                    errors.append(resp.text)
                else:
                    answers.append(resp.json())

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(30):
            if i % 3 == 2:  # roll back to a random earlier version
                target = list(version_weights)[i % len(version_weights)]
                assert httpx.post(f"{url}/v1/tasks/swap/rollback", json={"version": target}).status_code == 200
            else:
                which = (i + 1) % 2
                r = upload(url, "swap", weights[which], fp)
                assert r.status_code == 201, r.text
                version_weights[r.json()["version"]] = which
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    assert len(answers) > 30
    seen = set()
    for answer in answers:
        which = version_weights[answer["version"]]
        seen.add(answer["version"])
        got, want = scores(answer), expected_by_weights[which]
        assert max(abs(a - b) for ra, rb in zip(got, want) for a, b in zip(ra, rb)) <= 1e-4, answer["version"]
    assert len(seen) > 3  # the swaps really happened under load


@pytest.mark.slow  # a subprocess server on its own: in `pytest -m slow` (CI runs it)
def test_rss_stays_flat_over_upload_delete_cycles(server_process, tiny_dir):
    """400 cycles, each of a new shape (label count 2–201, bottleneck width 4–53), as in the report where
    every distinct shape left a pool behind forever (+2.4 GB over 1,000; bench/churn.py runs 1,000)."""
    url, proc = server_process
    fp = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
    kinds = ["ia3", "houlsby", "mixed", "houlsby"]
    blobs = [native.dumps(random_adapter(tiny_dir[1].spec, seed=i, kind=kinds[i % 4], width=4 + i % 50,
                                         num_labels=2 + i % 200), fp) for i in range(200)]
    rss = psutil.Process(proc.pid)

    def cycles(n: int, offset: int) -> None:
        with httpx.Client(timeout=30) as client:
            for i in range(offset, offset + n):
                r = client.put(f"{url}/v1/tasks/cycle", files=[("files", ("adapter.safetensors", blobs[i % 200]))])
                assert r.status_code == 201
                assert client.post(f"{url}/v1/classify", json={"task": "cycle", "inputs": "x"}).status_code == 200
                assert client.delete(f"{url}/v1/tasks/cycle").status_code == 204

    cycles(100, 0)  # warm-up: allocator pools, caches, pool capacity
    baseline = rss.memory_info().rss
    cycles(400, 7)
    grown = rss.memory_info().rss - baseline
    assert grown < 16 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 400 upload/delete cycles"
