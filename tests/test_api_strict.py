"""A strict, helpful API: unknown fields, content types, broken JSON and empty inputs are refused with a
message that says what to fix; every error type is documented in the OpenAPI document with an example."""

from __future__ import annotations

import httpx
import pytest

from tests.factories import random_adapter
from tests.server_fixture import serving_in_thread, upload


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    with serving_in_thread(tmp_path_factory.mktemp("data"), tiny_dir[1]) as (url, _):
        adapter = random_adapter(tiny_dir[1].spec, seed=1)
        assert upload(url, "t", adapter, tiny_dir[1].spec.fingerprint).status_code == 201
        yield url


def error(r: httpx.Response) -> dict:
    return r.json()["error"]


def test_a_misspelt_field_is_a_422_naming_it_and_the_right_one(server):
    r = httpx.post(f"{server}/v1/classify", json={"task": "t", "inputs": "x", "topk": 1})
    assert r.status_code == 422
    e = error(r)
    assert e["type"] == "unknown_field" and "'topk'" in e["message"] and "top_k" in e["message"]
    r = httpx.post(f"{server}/v1/tasks/t/rollback", json={"version": 1, "force": True})
    assert r.status_code == 422 and "'force'" in error(r)["message"]


def test_a_body_without_a_json_content_type_says_so(server):
    r = httpx.post(f"{server}/v1/classify", content=b'{"task": "t", "inputs": "x"}')
    assert r.status_code == 415
    e = error(r)
    assert e["type"] == "unsupported_media_type" and "Content-Type: application/json" in e["message"]
    r = httpx.post(f"{server}/v1/classify", content=b"task=t", headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_broken_json_names_the_line_and_column(server):
    r = httpx.post(f"{server}/v1/classify", content=b'{"task": "t",\n "inputs": "x",}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 422
    e = error(r)
    assert e["type"] == "invalid_json" and "line 2" in e["message"] and "column" in e["message"]


@pytest.mark.parametrize("inputs", ["", "   ", [], ["fine", ""], ["\n\t"]])
def test_empty_inputs_are_refused(server, inputs):
    r = httpx.post(f"{server}/v1/classify", json={"task": "t", "inputs": inputs})
    assert r.status_code == 422, r.text
    assert "empty" in error(r)["message"] or "at least one" in error(r)["message"]


def test_a_valid_request_still_works(server):
    r = httpx.post(f"{server}/v1/classify", json={"task": "t", "inputs": ["fine", "also fine"], "top_k": 1})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2


def test_every_error_status_is_documented_with_examples(server):
    doc = httpx.get(f"{server}/openapi.json").json()
    for path, methods in doc["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, op in methods.items():
            for status in ("401", "404", "422", "429", "503"):
                assert status in op["responses"], f"{method.upper()} {path} does not document {status}"
                examples = op["responses"][status]["content"]["application/json"].get("examples", {})
                assert examples, f"{method.upper()} {path} {status} has no example"
                for ex in examples.values():
                    assert set(ex["value"]["error"]) == {"type", "message"}
