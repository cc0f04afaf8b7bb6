"""A new user's first hour (issue 20): each stumble they reported, against real servers. The admin key
works for the CLI with --tenant; a mistyped task gets a did-you-mean from the caller's own tasks only;
an adapter for another backbone names both models and the retraining command; `serve` refuses a busy
port and a guessable admin key at once, before the model loads; /docs can send a key."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from safetensors import safe_open

from switchboard.adapter_store.formats import native
from switchboard.clients import sdk
from switchboard.clients.cli import main
from switchboard.server.settings import MIN_ADMIN_KEY_CHARS, PLACEHOLDER_ADMIN_KEYS, admin_key_refusal
from tests.factories import random_adapter
from tests.server_fixture import ROOT, free_port, serving_in_thread

ADMIN = "first-contact-admin-" + "k" * 32  # long enough for `serve` (the in-thread server does not check)


@pytest.fixture(scope="module")
def auth_server(tiny_dir, tmp_path_factory):
    with serving_in_thread(tmp_path_factory.mktemp("data"), tiny_dir[1], admin_key=ADMIN) as (url, state):
        blob = native.dumps(random_adapter(tiny_dir[1].spec, seed=3), state.runtime.engine.spec.fingerprint)
        for tenant, task in (("acme", "sentiment"), ("acme", "topics"), ("beta", "sentiment-beta"),
                             ("beta", "languages")):
            with sdk.Client(url, api_key=ADMIN, tenant=tenant) as client:
                path = Path(tmp_path_factory.mktemp("a")) / "adapter.safetensors"
                path.write_bytes(blob)
                client.upload(task, path)
        yield url, state


def _serve(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`switchboard serve` as a user starts it: no SWITCHBOARD_* from the test environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    return subprocess.run([sys.executable, "-m", "switchboard.clients.cli", "serve", *args],
                          env={**clean, "HF_HUB_OFFLINE": "1", **(env or {})}, capture_output=True, text=True,
                          timeout=120, cwd=cwd)


# ----- 4. the admin key and --tenant -------------------------------------------------------------------
def test_the_cli_uses_the_admin_key_from_the_environment_with_tenant(auth_server, capsys, monkeypatch):
    url, _ = auth_server
    monkeypatch.delenv("SWITCHBOARD_API_KEY", raising=False)
    monkeypatch.setenv("SWITCHBOARD_ADMIN_KEY", ADMIN)
    for argv in (["tasks", "--tenant", "acme", "--url", url, "--json"],
                 ["--tenant", "acme", "--url", url, "tasks", "--json"]):
        assert main(argv) == 0, capsys.readouterr().err
        assert [t["task"] for t in json.loads(capsys.readouterr().out)["tasks"]] == ["sentiment", "topics"]
    assert main(["tasks", "--url", url, "--json"]) == 0  # no --tenant: the tenant `default`, which has none
    assert json.loads(capsys.readouterr().out) == {"tasks": []}
    key = sdk.Client(url, api_key=ADMIN).create_key("beta", ["classify", "manage"]).key
    monkeypatch.setenv("SWITCHBOARD_API_KEY", key)  # a tenant key in the environment comes first
    assert main(["tasks", "--url", url, "--json"]) == 0
    assert [t["task"] for t in json.loads(capsys.readouterr().out)["tasks"]] == ["languages", "sentiment-beta"]
    monkeypatch.delenv("SWITCHBOARD_API_KEY")
    monkeypatch.delenv("SWITCHBOARD_ADMIN_KEY")
    assert main(["tasks", "--url", url]) == 1
    err = capsys.readouterr().err
    assert "unauthorized" in err and "hint:" in err and "--tenant" in err


# ----- 5c. did you mean, within the caller's tenant --------------------------------------------------
def test_a_mistyped_task_gets_a_did_you_mean_from_its_own_tenant_only(auth_server, capsys):
    url, _ = auth_server
    acme = {"Authorization": f"Bearer {ADMIN}", "X-Switchboard-Tenant": "acme"}
    beta = {"Authorization": f"Bearer {ADMIN}", "X-Switchboard-Tenant": "beta"}
    r = httpx.post(f"{url}/v1/classify", headers=acme, json={"task": "sentimnet", "inputs": "x"})
    assert r.status_code == 404
    assert r.json()["error"] == {"type": "task_not_found", "message": "unknown task 'sentimnet'; did you mean "
                                                                      "'sentiment'?"}
    for method, path, body in (("GET", "/v1/tasks/topcis", None), ("DELETE", "/v1/tasks/topcis", None),
                               ("POST", "/v1/tasks/topcis/rollback", {"version": 1}),
                               ("POST", "/v1/classify", {"tasks": ["sentiment", "topcis"], "inputs": "x"})):
        r = httpx.request(method, f"{url}{path}", headers=acme, json=body)
        assert r.status_code == 404 and r.json()["error"]["message"].endswith("did you mean 'topics'?"), r.text
    # beta's own near names are offered; acme's never are, even when closer
    r = httpx.post(f"{url}/v1/classify", headers=beta, json={"task": "sentimnet", "inputs": "x"})
    assert r.json()["error"]["message"] == "unknown task 'sentimnet'; did you mean 'sentiment-beta'?"
    r = httpx.get(f"{url}/v1/tasks/topcis", headers=beta)
    assert r.json()["error"]["message"] == "unknown task 'topcis'", "another tenant's task name leaked"
    r = httpx.get(f"{url}/v1/tasks/zzzzzzzz", headers=acme)
    assert r.json()["error"]["message"] == "unknown task 'zzzzzzzz'"
    assert main(["classify", "sentimnet", "x", "--url", url, "--api-key", ADMIN, "--tenant", "acme"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: unknown task 'sentimnet'; did you mean 'sentiment'? (404 task_not_found)"


def test_a_deleted_task_is_no_longer_suggested(tiny_dir, tmp_path):
    with serving_in_thread(tmp_path, tiny_dir[1]) as (url, state), sdk.Client(url) as client:
        path = tmp_path / "adapter.safetensors"
        path.write_bytes(native.dumps(random_adapter(tiny_dir[1].spec, seed=4), state.runtime.engine.spec.fingerprint))
        client.upload("reviews", path)
        with pytest.raises(sdk.TaskNotFound, match="did you mean 'reviews'"):
            client.classify("reveiws", "x")
        client.delete("reviews")
        with pytest.raises(sdk.TaskNotFound) as gone:
            client.classify("reveiws", "x")
        assert gone.value.message == "unknown task 'reveiws'"


# ----- 5d. unknown routes ------------------------------------------------------------------------------
def test_an_unknown_route_answers_the_json_error_shape(auth_server):
    url, _ = auth_server
    r = httpx.get(f"{url}/v1/clasify")
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")
    assert set(r.json()) == {"error"} and r.json()["error"]["type"] == "not_found"
    assert isinstance(r.json()["error"]["message"], str)


def test_an_unknown_route_is_named_and_points_to_the_docs(auth_server):
    url, _ = auth_server
    message = httpx.post(f"{url}/v1/clasify", json={}).json()["error"]["message"]
    assert "/v1/clasify" in message and "/docs" in message


# ----- 5b. an adapter trained on another backbone ------------------------------------------------------
def test_an_adapter_for_another_backbone_names_both_models_and_how_to_retrain(tiny_dir, tmp_path, capsys):
    spec = tiny_dir[1].spec
    other = random_adapter(spec, seed=5)
    blob = native.dumps(other, "sha256:" + "0" * 32, backbone_name="org/other-model")
    with pytest.raises(Exception, match="trained on backbone 'org/other-model'") as refused:
        native.loads(blob, spec.fingerprint, backbone_name=spec.name)
    assert f"this server runs '{spec.name}'" in str(refused.value)
    assert "switchboard train --model DIR" in str(refused.value) and spec.name in str(refused.value)
    assert native.loads(native.dumps(other, spec.fingerprint), spec.fingerprint).kind == "ia3"  # older files
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter.safetensors").write_bytes(blob)
    with serving_in_thread(tmp_path / "data", tiny_dir[1]) as (url, _):
        with sdk.Client(url) as client, pytest.raises(sdk.InvalidAdapter) as bad:
            client.upload("t", tmp_path / "other")
        assert "'org/other-model'" in bad.value.message and "switchboard train" in bad.value.message
        assert main(["upload", "t", str(tmp_path / "other"), "--url", url]) == 1
        err = capsys.readouterr().err
        hint = next(line for line in err.splitlines() if line.startswith("hint: "))
        assert f"this server runs {spec.name}" in hint and "switchboard train --model DIR" in hint
        assert "upload a directory saved by" not in err


def test_switchboard_train_records_the_backbone_name(tiny_dir, tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(8)))
    out = tmp_path / "out"
    assert main(["train", "--data", str(data), "--kind", "ia3", "--out", str(out), "--model", str(tiny_dir[0]),
                 "--steps", "1", "--batch-size", "4", "--threads", "1"]) == 0, capsys.readouterr().err
    with safe_open(out / "adapter.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["backbone_name"] == str(tiny_dir[0]) and meta["backbone_fingerprint"].startswith("sha256:")


# ----- 5a. the CSV columns -----------------------------------------------------------------------------
def test_a_csv_without_text_and_label_names_its_columns_and_the_flags(tmp_path, capsys):
    data = tmp_path / "reviews.csv"
    data.write_text("sentence,category\ngood,pos\nbad,neg\n")
    for extra in (["--kind", "ia3", "--out", str(tmp_path / "o")], ["--remote", "reviews"]):
        assert main(["train", "--data", str(data), *extra, "--url", f"http://127.0.0.1:{free_port()}"]) == 2
        error, hint = capsys.readouterr().err.splitlines()
        assert error.startswith("error: ") and "missing column(s)" in error and "sentence" in error
        assert hint.startswith("hint: ") and "--text-column" in hint and "--label-column" in hint
        assert "sentence" in hint and "category" in hint
    assert main(["train", "--data", str(data), "--kind", "ia3", "--out", str(tmp_path / "o"), "--text-column",
                 "sentence", "--label-column", "category", "--model", str(tmp_path / "no-model")]) == 2
    error, hint = capsys.readouterr().err.splitlines()  # the flags fix it; the next stumble: a wrong --model
    assert error == f"error: no config.json in model directory {tmp_path / 'no-model'}"
    assert hint.startswith("hint: --model takes a local model directory")


# ----- 5e, 5f. task names and URLs ---------------------------------------------------------------------
def test_a_slash_in_a_task_name_says_which_characters_are_allowed(tmp_path, capsys):
    nowhere = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "adapter.safetensors").write_bytes(b"x")
    for argv in (["upload", "a/b", str(tmp_path)], ["classify", "a/b", "text"], ["task", "a b"]):
        assert main([*argv, "--url", nowhere]) == 2  # refused before anything is sent
        error, hint = capsys.readouterr().err.splitlines()
        assert error.startswith("error: invalid task name") and "letters, digits, '.', '_' and '-'" in error
        assert hint in ("hint: for example 'a-b'",)


def test_a_url_without_a_scheme_works_and_a_wrong_scheme_says_what_to_write(auth_server, capsys):
    url, _ = auth_server
    assert main(["--url", url.removeprefix("http://"), "--api-key", ADMIN, "tasks", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"tasks": []}
    assert main(["--url", "ftp://example.org", "tasks"]) == 2
    error, hint = capsys.readouterr().err.splitlines()
    assert "write http://HOST:PORT" in error and hint == "hint: for example --url http://127.0.0.1:8000 (or set " \
                                                         "SWITCHBOARD_URL)"


# ----- 5g. a busy port -----------------------------------------------------------------------------------
def test_serve_on_a_busy_port_fails_at_once_before_loading_the_model(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _serve("--port", str(port), "--model", str(tmp_path / "no-such-model"), "--data-dir", str(tmp_path))
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert f"error: port {port} on 127.0.0.1 is already in use" in lines
    hint = lines[lines.index(f"error: port {port} on 127.0.0.1 is already in use") + 1]
    assert hint.startswith("hint: ") and "--port" in hint
    assert "no-such-model" not in r.stderr and "config.json" not in r.stderr  # the model was never looked at


# ----- 6. guessable admin keys ---------------------------------------------------------------------------
def test_serve_refuses_a_short_or_placeholder_admin_key_before_loading_the_model(tmp_path):
    placeholder = sorted(PLACEHOLDER_ADMIN_KEYS)[0]
    key_file = tmp_path / "admin_key"
    key_file.write_text(placeholder + "\n")
    for env, args in (({"SWITCHBOARD_ADMIN_KEY": "abc"}, []), ({"SWITCHBOARD_ADMIN_KEY": placeholder}, []),
                      ({}, ["--admin-key-file", str(key_file)])):
        r = _serve("--port", str(free_port()), "--model", str(tmp_path / "no-such-model"), *args, env=env)
        assert r.returncode == 1, r.stderr
        lines = r.stderr.splitlines()
        error = next(i for i, line in enumerate(lines) if line.startswith("error: "))
        assert "admin key" in lines[error] and lines[error + 1].startswith("hint: ")
        assert "secrets.token_urlsafe(32)" in lines[error + 1]
        assert "no-such-model" not in r.stderr
    assert "3 characters" in _serve("--port", str(free_port()), env={"SWITCHBOARD_ADMIN_KEY": "abc"}).stderr
    # an empty variable used to log "auth mode" and serve in open mode (even off loopback): refused too
    empty = _serve("--host", "0.0.0.0", "--port", str(free_port()), env={"SWITCHBOARD_ADMIN_KEY": ""})
    assert empty.returncode == 1 and "0 characters" in empty.stderr


def test_admin_key_rules():
    assert admin_key_refusal(None) is None
    assert admin_key_refusal(secrets.token_urlsafe(32)) is None
    assert admin_key_refusal("x" * (MIN_ADMIN_KEY_CHARS - 1)) is not None
    assert admin_key_refusal("x" * MIN_ADMIN_KEY_CHARS) is None
    assert all(admin_key_refusal(p) for p in PLACEHOLDER_ADMIN_KEYS)


def test_every_admin_key_written_in_deploy_is_refused():
    """A literal admin key in a deploy file is an example users copy: it must be on the refused list (or too
    short). `${VAR…}`/`$(…)` references are not literals."""
    pattern = re.compile(r"SWITCHBOARD_ADMIN_KEY[\"']?\s*[:=]\s*[\"']?([^\s\"'#]+)"
                         r"|name:\s*[\"']?SWITCHBOARD_ADMIN_KEY[\"']?\s*\n\s*value:\s*[\"']?([^\s\"'#]+)")
    files = [p for p in (ROOT / "deploy").rglob("*") if p.is_file()] + [ROOT / "Dockerfile"]
    found = {m.group(1) or m.group(2) for p in files for m in pattern.finditer(p.read_text(errors="replace"))}
    literals = {v for v in found if not v.startswith("$")}
    assert literals, "the k8s Secret ships a placeholder: this test must see it"
    assert all(admin_key_refusal(v) for v in literals), {v for v in literals if not admin_key_refusal(v)}


# ----- 7. /docs can send a key -----------------------------------------------------------------------------
def test_the_openapi_document_declares_the_bearer_key(auth_server):
    url, _ = auth_server
    doc = httpx.get(f"{url}/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert len(schemes) == 1 and next(iter(schemes.values()))["type"] == "http"
    name, scheme = next(iter(schemes.items()))
    assert scheme["scheme"] == "bearer"
    for method, path in (("post", "/v1/classify"), ("put", "/v1/tasks/{task}"), ("get", "/v1/keys")):
        assert doc["paths"][path][method]["security"] == [{name: []}], (method, path)
    for path in ("/health", "/metrics"):
        assert "security" not in doc["paths"][path]["get"], path
    assert "/docs" not in doc["paths"] and "/openapi.json" not in doc["paths"]
    # and what it declares is true: those operations refuse a request without the key, /health does not
    assert httpx.post(f"{url}/v1/classify", json={"task": "t", "inputs": "x"}).status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
