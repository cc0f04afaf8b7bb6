"""Hostile inputs of issue 20, against the real app on loopback HTTP: each is a small 4xx JSON error
(never a 500, never an answer the schema does not allow).

- bodies of ~95,000 unknown fields, flat or nested in huge arrays: one bounded error, not one per field;
- lone surrogates (JSON "\\ud800") in texts, labels and canaries: 422 naming the field;
- finite but huge adapter weights: refused at upload; and scores stay finite numbers even when the
  logits overflow anyway.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from safetensors.torch import save

from switchboard.adapter_store.formats import native
from switchboard.server.core.adapter import MAX_ABS_WEIGHT, TaskAdapter
from switchboard.server.http.schemas import MAX_OBJECT_FIELDS
from tests.factories import TEXTS, random_adapter
from tests.server_fixture import serving_in_thread, upload

SMALL = 2048  # bytes: every error body here stays below this, whatever the request held


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    with serving_in_thread(tmp_path_factory.mktemp("data"), tiny_dir[1], model=tiny_dir[0]) as (url, state):
        fp = state.runtime.engine.spec.fingerprint
        assert upload(url, "keep", random_adapter(tiny_dir[1].spec, seed=1), fp).status_code == 201
        yield url, fp


def refused(r: httpx.Response, status: int, type_: str, *needles: str) -> str:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert len(r.content) < SMALL, f"an error body of {len(r.content)} bytes"
    error = r.json()["error"]
    assert error["type"] == type_, error
    for needle in needles:
        assert needle in error["message"], error
    return error["message"]


def post_json(url: str, body: object) -> httpx.Response:
    """ASCII JSON: a lone surrogate travels as the `\\ud800` escape, as a hostile client sends it
    (httpx's own encoder writes UTF-8, which cannot hold one)."""
    return httpx.post(url, content=json.dumps(body, separators=(",", ":")),
                      headers={"content-type": "application/json"}, timeout=60)


# ----- 1. many unknown fields ---------------------------------------------------------------------

def test_95000_unknown_fields_are_one_small_error_naming_the_first_few(server):
    url, _ = server
    body = {"task": "keep", "inputs": "x", **{f"f{i:05d}": 1 for i in range(95_000)}}
    blob = json.dumps(body, separators=(",", ":"))
    assert 1_000_000 < len(blob) <= 1 << 20  # the reported body: 1 MiB of field names
    message = refused(post_json(f"{url}/v1/classify", body), 422, "unknown_field",
                      f"95002 fields; at most {MAX_OBJECT_FIELDS} are read",
                      "'f00000'", "'f00004'", "and 94995 more", "this endpoint takes: task, tasks, inputs")
    assert "'f00005'" not in message
    # the server goes on answering
    assert httpx.post(f"{url}/v1/classify", json={"task": "keep", "inputs": "x"}).status_code == 200


def test_a_few_unknown_fields_still_get_did_you_mean(server):
    url, _ = server
    refused(httpx.post(f"{url}/v1/classify", json={"task": "keep", "inputs": "x", "topk": 1}), 422, "unknown_field",
            "'topk' (did you mean 'top_k'?)")
    body = {"task": "keep", "inputs": "x", **{f"extra{i}": 1 for i in range(40)}}  # under the bound: named, capped
    message = refused(httpx.post(f"{url}/v1/classify", json=body), 422, "unknown_field", "and 35 more")
    assert message.count("'extra") == 5
    long_name = {"task": "keep", "inputs": "x", "z" * 100_000: 1}  # a long name is cut, not echoed
    refused(post_json(f"{url}/v1/classify", long_name), 422, "unknown_field", "'" + "z" * 40 + "'…")


def test_unknown_fields_nested_in_huge_arrays_are_one_small_error(server):
    url, _ = server
    train = f"{url}/v1/tasks/nested/train"
    # 60,000 objects of unknown fields: the array stops at its first bad item
    refused(post_json(train, {"examples": [{"txt": "a", "lbl": "b"}] * 60_000}), 422, "unknown_field",
            "in examples[0]", "'txt' (did you mean 'text'?)", "'lbl' (did you mean 'label'?)",
            "examples[0] takes: text, text_pair, label")
    # one nested object of 50,000 keys: refused whole, named by where it sits
    wide = {"text": "a", "label": "b", **{f"k{i}": 0 for i in range(50_000)}}
    refused(post_json(train, {"examples": [{"text": "a", "label": "x"}, wide]}), 422, "unknown_field",
            "50002 fields; at most 64 are read: unknown fields 'k0'", "and 49995 more in examples[1]",
            "examples[1] takes: text, text_pair, label")
    refused(post_json(train, {"examples": [{"text": "a", "label": "x"}] * 2, "eval_examples": [wide] * 10}), 422,
            "unknown_field", "in eval_examples[0]")
    # huge arrays of objects where strings belong
    refused(post_json(f"{url}/v1/classify", {"task": "keep", "inputs": [{"a": 1}] * 100_000}), 422,
            "validation_error")
    refused(post_json(f"{url}/v1/embed", {"inputs": [[1, 2]] * 100_000}), 422, "validation_error")
    assert httpx.get(f"{url}/v1/jobs").json()["jobs"] == []


# ----- 2. lone surrogates -----------------------------------------------------------------------------

def test_a_lone_surrogate_in_a_text_is_a_422_naming_it(server):
    url, _ = server
    bad = "caf\ud800"  # sent as JSON's "\ud800" escape, which json.loads turns into a lone surrogate
    refused(post_json(f"{url}/v1/classify", {"task": "keep", "inputs": ["ok", "ok", "ok", bad]}), 422,
            "validation_error", "inputs[3] is not valid Unicode text: it holds a lone surrogate")
    refused(post_json(f"{url}/v1/classify", {"tasks": ["keep"], "inputs": bad}), 422, "validation_error",
            "inputs is not valid Unicode text")
    refused(post_json(f"{url}/v1/embed", {"inputs": ["fine", "\udfff"]}), 422, "validation_error",
            "inputs[1] is not valid Unicode text")
    examples = [{"text": "a", "label": "x"}, {"text": bad, "label": "y"}]
    refused(post_json(f"{url}/v1/tasks/s/train", {"examples": examples}), 422, "validation_error",
            "examples[1].text is not valid Unicode text")
    examples = [{"text": "a", "label": "x"}, {"text": "b", "label": "y\ud800"}]
    refused(post_json(f"{url}/v1/tasks/s/train", {"examples": examples}), 422, "validation_error",
            "examples[1].label is not valid Unicode text")
    refused(post_json(f"{url}/v1/classify", {"task": "keep", "inputs": "x", "\ud800": 1}), 422,
            "validation_error", "a field name is not valid Unicode text")
    ok = post_json(f"{url}/v1/classify", {"task": "keep", "inputs": ["naïve 😀 ✓"]})
    assert ok.status_code == 200  # astral characters (a surrogate *pair* in JSON) are fine


def test_a_lone_surrogate_in_upload_labels_or_canary_is_a_422(server, tiny_dir):
    url, fp = server
    blob = native.dumps(random_adapter(tiny_dir[1].spec, seed=2, num_labels=2), fp)
    files = [("files", ("a.safetensors", blob))]
    # the form's labels (a JSON array: json.dumps escapes the surrogate)
    message = refused(httpx.put(f"{url}/v1/tasks/sur", files=files, data={"labels": json.dumps(["ok", "b\ud800"])}),
                      422, "validation_error")
    assert "labels[1] is not valid Unicode text: it holds a lone surrogate" in message
    canary = json.dumps([{"text": "fine", "label": "label0"}, {"text": "x\ud800", "label": "label1"}])
    refused(httpx.put(f"{url}/v1/tasks/sur", files=files, data={"canary": canary}), 422, "validation_error",
            "is not valid Unicode text: it holds a lone surrogate")
    canary = json.dumps([{"text": "fine", "label": "label\ud800"}])
    r = httpx.put(f"{url}/v1/tasks/sur", files=files, data={"canary": canary})
    assert r.status_code == 422 and len(r.content) < SMALL, r.text
    assert httpx.get(f"{url}/v1/tasks/sur").status_code == 404


def test_a_lone_surrogate_in_an_adapter_files_labels_is_invalid_adapter(server, tiny_dir):
    url, fp = server
    spec = tiny_dir[1].spec
    adapter = random_adapter(spec, seed=3, num_labels=2)
    adapter.labels = ["fine", "bad\ud800"]  # native metadata: json.dumps escapes it, json.loads restores it
    refused(upload(url, "sur-file", adapter, fp), 422, "invalid_adapter", "labels[1] is not valid Unicode text")
    # AdapterHub: label2id in head_config.json
    d = spec.hidden_size
    prefix = "bert.encoder.layer.0.attention.output.adapters.hub."
    tensors = {prefix + "adapter_down.0.weight": torch.zeros(4, d), prefix + "adapter_down.0.bias": torch.zeros(4),
               prefix + "adapter_up.weight": torch.zeros(d, 4), prefix + "adapter_up.bias": torch.zeros(d)}
    config = {"config": {"reduction_factor": 16, "original_ln_before": False, "original_ln_after": True,
                         "residual_before_ln": True, "non_linearity": "relu"}, "name": "hub"}
    head = {"config": {"head_type": "classification", "layers": 1, "num_labels": 2,
                       "label2id": {"ok": 0, "b\ud800": 1}}}
    files = [("files", ("adapter_config.json", json.dumps(config).encode())),
             ("files", ("adapter.safetensors", save(tensors))),
             ("files", ("head_config.json", json.dumps(head).encode())),
             ("files", ("model_head.safetensors", save({"heads.hub.0.weight": torch.zeros(2, d),
                                                        "heads.hub.0.bias": torch.zeros(2)})))]
    refused(httpx.put(f"{url}/v1/tasks/sur-hub", files=files), 422, "invalid_adapter", "label2id",
            "is not valid Unicode text")
    head["config"]["label2id"] = {"ok": 0, "fine": 1}
    files[2] = ("files", ("head_config.json", json.dumps(head).encode()))
    assert httpx.put(f"{url}/v1/tasks/sur-hub", files=files).status_code == 201  # the same upload, valid labels


def test_content_hash_never_raises_on_a_lone_surrogate(tiny_dir):
    adapter = random_adapter(tiny_dir[1].spec, seed=4, num_labels=2)
    adapter.labels = ["a", "\ud800"]
    assert len(adapter.content_hash()) == 64
    adapter.labels = ["a", "\udfff"]
    first = adapter.content_hash()
    adapter.labels = ["a", "b"]
    assert adapter.content_hash() != first


# ----- 3. huge weights -----------------------------------------------------------------------------

@pytest.mark.parametrize("value", [3e38, -1e6, MAX_ABS_WEIGHT * 1.01, float("nan"), float("inf")])
@pytest.mark.parametrize("part", ["ia3", "head"])
def test_weights_too_large_for_any_trained_adapter_are_refused_at_upload(server, tiny_dir, part, value):
    url, fp = server
    adapter = random_adapter(tiny_dir[1].spec, seed=5)
    weights = adapter.parts[part]
    tensor = weights.vectors["k_out"] if part == "ia3" else weights.out_w
    tensor.view(-1)[7] = value
    name = "ia3.k_out" if part == "ia3" else "head.out_w"
    message = refused(upload(url, "huge-weights", adapter, fp), 422, "invalid_adapter", f"tensor {name}")
    assert ("NaN or Inf" in message) if not abs(value) < float("inf") else (f"{MAX_ABS_WEIGHT:g}" in message)
    assert httpx.get(f"{url}/v1/tasks/huge-weights").status_code == 404


def test_weights_at_the_bound_are_accepted(server, tiny_dir):
    url, fp = server
    adapter = random_adapter(tiny_dir[1].spec, seed=6)
    adapter.parts["head"].out_b[0] = -MAX_ABS_WEIGHT
    assert upload(url, "at-bound", adapter, fp).status_code == 201


def test_overflowing_logits_still_answer_finite_scores(tiny_dir, tmp_path, monkeypatch):
    """Weights upload validation would refuse (loaded by skipping it), standing in for a reduced-precision
    forward pass that overflows: logits of +inf, -inf and NaN, yet every score is a finite number, probabilities sum to 1 and raw scores stay within float32."""
    spec = tiny_dir[1].spec
    adapter = random_adapter(spec, seed=7, num_labels=4)
    head = adapter.parts["head"]
    head.out_w[:3] = 0.0
    head.out_b[:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])  # logits: +inf, -inf, NaN, finite
    monkeypatch.setattr(TaskAdapter, "validate", lambda self, spec: None)
    with serving_in_thread(tmp_path, tiny_dir[1]) as (url, _):
        assert upload(url, "overflow", adapter, spec.fingerprint).status_code == 201
        for raw in (False, True):
            r = httpx.post(f"{url}/v1/classify", json={"task": "overflow", "inputs": TEXTS[:3], "raw_scores": raw})
            assert r.status_code == 200, r.text
            assert "null" not in r.text and "NaN" not in r.text and "Infinity" not in r.text
            for row in r.json()["predictions"]:
                scores = {p["label"]: p["score"] for p in row}
                assert all(isinstance(s, float) and abs(s) <= torch.finfo(torch.float32).max for s in scores.values())
                assert max(scores, key=scores.get) == "label0"
                if raw:
                    assert scores["label0"] == torch.finfo(torch.float32).max
                    assert scores["label1"] == -torch.finfo(torch.float32).max
                else:
                    assert sum(scores.values()) == pytest.approx(1.0)
                    assert scores["label0"] == pytest.approx(1.0)
