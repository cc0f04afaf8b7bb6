"""What other multi-adapter servers lack: one text under many tasks in one batch, embeddings from the same
backbone in the same batches, and an upload that goes live only if it passes its canary."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from switchboard.adapter_store.formats import native
from switchboard.server.core.backbone import load_backbone
from tests.factories import KINDS, TEXTS, random_adapter
from tests.server_fixture import metric_samples, serving_in_thread, upload


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    backbone = tiny_dir[1]
    adapters = {f"t{i}": random_adapter(backbone.spec, seed=400 + i, backbone_model=backbone.model, **kw)
                for i, kw in enumerate(KINDS)}
    with serving_in_thread(tmp_path_factory.mktemp("data"), backbone, batch_wait_ms=20) as (url, state):
        for name, adapter in adapters.items():
            assert upload(url, name, adapter, backbone.spec.fingerprint).status_code == 201
        yield url, adapters, state


def test_fan_out_equals_one_call_per_task_and_runs_in_one_batch(served):
    url, adapters, _ = served
    names = list(adapters)[:4]
    texts = TEXTS[:3]
    before = metric_samples(url)["switchboard_batches_total"]
    r = httpx.post(f"{url}/v1/classify", json={"tasks": names, "inputs": texts, "raw_scores": True})
    assert r.status_code == 200, r.text
    after = metric_samples(url)["switchboard_batches_total"]
    assert after - before == 1, "the fan-out rows did not share one forward pass"
    results = r.json()["results"]
    assert [x["task"] for x in results] == names
    for result in results:
        alone = httpx.post(f"{url}/v1/classify", json={"task": result["task"], "inputs": texts, "raw_scores": True})
        want = alone.json()
        assert result["version"] == want["version"]
        for got_row, want_row in zip(result["predictions"], want["predictions"]):
            assert [p["label"] for p in got_row] == [p["label"] for p in want_row]
            assert max(abs(a["score"] - b["score"]) for a, b in zip(got_row, want_row)) <= 1e-4


def test_fan_out_refuses_unknown_tasks_duplicates_and_too_many_rows(served):
    url, adapters, _ = served
    names = list(adapters)
    r = httpx.post(f"{url}/v1/classify", json={"tasks": [names[0], "nope"], "inputs": "x"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "task_not_found"
    r = httpx.post(f"{url}/v1/classify", json={"tasks": [names[0], names[0]], "inputs": "x"})
    assert r.status_code == 422 and "twice" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/classify", json={"tasks": names[:2], "task": names[0], "inputs": "x"})
    assert r.status_code == 422 and "exactly one" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/classify", json={"tasks": names[:2], "inputs": ["x"] * 40})
    assert r.status_code == 413 and "rows" in r.json()["error"]["message"]


def test_a_canary_that_fails_keeps_the_current_version_and_stores_nothing(served, tiny_dir):
    url, adapters, _ = served
    backbone = tiny_dir[1]
    current = httpx.get(f"{url}/v1/tasks/t0").json()
    new = random_adapter(backbone.spec, seed=999)
    blob = native.dumps(new, backbone.spec.fingerprint)
    # what the new version answers, learnt by uploading it under another name
    assert upload(url, "probe", new, backbone.spec.fingerprint).status_code == 201
    answers = httpx.post(f"{url}/v1/classify", json={"task": "probe", "inputs": TEXTS[:3], "top_k": 1}).json()
    stated = [{"text": t, "label": p[0]["label"]} for t, p in zip(TEXTS[:3], answers["predictions"])]
    wrong = [dict(stated[0], label=next(lb for lb in new.labels if lb != stated[0]["label"])), *stated[1:]]
    r = httpx.put(f"{url}/v1/tasks/t0", files=[("files", ("adapter.safetensors", blob))],
                  data={"canary": json.dumps(wrong)})
    assert r.status_code == 409 and r.json()["error"]["type"] == "canary_failed"
    assert "2 of 3" in r.json()["error"]["message"]
    after = httpx.get(f"{url}/v1/tasks/t0").json()
    assert after["version"] == current["version"] and len(after["versions"]) == len(current["versions"])
    # the same upload with a canary it passes becomes current
    r = httpx.put(f"{url}/v1/tasks/t0", files=[("files", ("adapter.safetensors", blob))],
                  data={"canary": json.dumps(stated)})
    assert r.status_code == 201, r.text
    assert httpx.get(f"{url}/v1/tasks/t0").json()["version"] == r.json()["version"]


@pytest.mark.parametrize("canary,status", [("[]", 422), ("not json", 422), ('[{"text": "x"}]', 422),
                                           ('[{"text": "x", "label": "nope"}]', 422),
                                           (json.dumps([{"text": "x", "label": "label0"}] * 17), 413)])
def test_bad_canaries_are_refused(served, tiny_dir, canary, status):
    url, _, _ = served
    blob = native.dumps(random_adapter(tiny_dir[1].spec, seed=5), tiny_dir[1].spec.fingerprint)
    r = httpx.put(f"{url}/v1/tasks/canary-bad", files=[("files", ("adapter.safetensors", blob))],
                  data={"canary": canary})
    assert r.status_code == status, r.text
    assert httpx.get(f"{url}/v1/tasks/canary-bad").status_code == 404


def test_embeddings_are_sentence_transformers_own_and_share_batches(tmp_path):
    """Real MiniLM: /v1/embed equals sentence-transformers' encode (normalised) at 1e-5."""
    from sentence_transformers import SentenceTransformer

    from switchboard.server.core.backbone import default_model_path

    texts = ["a chess engine for the terminal", "DNS server", "Scientific plotting package for python"]
    want = SentenceTransformer(str(default_model_path()), device="cpu").encode(texts, normalize_embeddings=True)
    backbone = load_backbone()
    with serving_in_thread(tmp_path, backbone) as (url, _):
        r = httpx.post(f"{url}/v1/embed", json={"inputs": texts})
        assert r.status_code == 200, r.text
        body = r.json()
        raw = httpx.post(f"{url}/v1/embed", json={"inputs": texts[0], "normalize": False}).json()
    got = torch.tensor(body["embeddings"])
    assert body["dim"] == 384 and got.shape == (3, 384)
    assert (got - torch.tensor(want)).abs().max().item() <= 1e-5
    unnormalised = torch.tensor(raw["embeddings"][0])
    assert abs(unnormalised.norm().item() - 1.0) > 1e-3  # really not normalised
    assert torch.allclose(unnormalised / unnormalised.norm(), got[0], atol=1e-5)
