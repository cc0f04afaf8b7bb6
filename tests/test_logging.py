"""Logs an operator can act on: every response carries a request id that the log lines carry too; a
500 sends a generic body (never the exception text) while the log holds the traceback; `--log-format
json` writes one JSON object per line, start-up summary included."""

from __future__ import annotations

import io
import json
import logging

import httpx
import pytest

from switchboard.server.log_config import REQUEST_ID, RequestIdFilter, json_formatter
from tests.factories import random_adapter
from tests.server_fixture import running_server, serving_in_thread, upload


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    with serving_in_thread(tmp_path_factory.mktemp("data"), tiny_dir[1]) as (url, state):
        fp = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
        assert upload(url, "t", random_adapter(tiny_dir[1].spec, seed=1), fp).status_code == 201
        yield url, state


def test_request_ids_are_echoed_or_generated(server):
    url, _ = server
    given = httpx.get(f"{url}/v1/tasks", headers={"X-Request-Id": "client-42.a"})
    assert given.headers["x-request-id"] == "client-42.a"
    for hostile in ("x" * 65, "two words", "a/b", "<script>"):
        r = httpx.get(f"{url}/v1/tasks", headers={"X-Request-Id": hostile})
        assert r.headers["x-request-id"] != hostile and len(r.headers["x-request-id"]) == 16
    assert httpx.get(f"{url}/v1/tasks/nope").headers["x-request-id"]  # errors carry one too


def test_a_500_is_generic_for_the_client_and_a_traceback_in_the_log(server, caplog, monkeypatch):
    url, state = server
    engine = state.runtime.batcher._engine

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(engine, "forward", broken)
    with caplog.at_level(logging.ERROR):
        r = httpx.post(f"{url}/v1/classify", json={"task": "t", "inputs": "x"}, headers={"X-Request-Id": "req-500"})
    assert r.status_code == 500
    body = r.json()["error"]
    assert body["type"] == "internal_error" and "req-500" in body["message"]
    assert "secret" not in r.text and "RuntimeError" not in r.text
    logged = [rec for rec in caplog.records if rec.exc_info and "secret internal detail" in str(rec.exc_info[1])]
    assert logged, "the traceback must be in the log"
    assert any("req-500" in rec.getMessage() for rec in logged)
    monkeypatch.undo()
    assert httpx.post(f"{url}/v1/classify", json={"task": "t", "inputs": "x"}).status_code == 200


def test_json_formatter_writes_one_object_per_line_with_the_request_id():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("switchboard.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    token = REQUEST_ID.set("abc123")
    try:
        logger.warning("queue is %d rows deep", 7)
    finally:
        REQUEST_ID.reset(token)
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["message"] == "queue is 7 rows deep" and line["request_id"] == "abc123"
    assert line["level"] == "WARNING" and line["logger"] == "switchboard.test.json" and line["time"]


def test_serve_logs_json_lines_with_a_start_up_summary(tiny_dir, tmp_path):
    with running_server(tiny_dir[0], tmp_path, extra_args=["--log-format", "json", "--log-level", "info"]) as (url, _):
        httpx.get(f"{url}/v1/tasks/nope")
    lines = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines() if line.strip()]
    assert any(m["message"].startswith("ready: model") and "precision fp32" in m["message"] for m in lines)
    assert any("serving on http://127.0.0.1" in m["message"] and "OPEN MODE" in m["message"] for m in lines)
    assert any(m["logger"] == "uvicorn.access" for m in lines)  # access lines in the same format
