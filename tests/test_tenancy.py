"""Tenants for real: keys shown once and stored hashed, surviving a restart; namespaces that share
blobs by content but never each other's tasks; quotas that refuse before writing; an audit line per
management action with no secret in any log; old data directories migrated to tenant `default`;
open mode refused off loopback."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys

import httpx
import pytest

from switchboard.adapter_store.formats import native
from switchboard.clients import sdk
from switchboard.clients.cli import main
from switchboard.server.runtime.tenancy import open_mode_refusal
from tests.factories import TEXTS, random_adapter
from tests.server_fixture import ROOT, free_port, serving_in_thread

ADMIN = "the-admin-key-of-this-test"


def admin(tenant: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    return headers | ({"X-Switchboard-Tenant": tenant} if tenant else {})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_shown_once_stored_hashed_revocable_and_survive_a_restart(tiny_dir, tmp_path, caplog):
    spec = tiny_dir[1].spec
    with caplog.at_level(logging.DEBUG):
        with serving_in_thread(tmp_path, tiny_dir[1], admin_key=ADMIN) as (url, _):
            with sdk.Client(url, api_key=ADMIN) as root:
                created = root.create_key("acme", ["classify", "manage"], name="ci")
                assert created.key.startswith("sb_") and len(created.key) > 40
                assert all(k.key is None for k in root.keys())  # never shown again
                other = root.create_key("acme", ["classify"])
            with sdk.Client(url, api_key=created.key) as acme:
                fp = acme.backbone()["fingerprint"]
                path = tmp_path / "a.safetensors"
                path.write_bytes(native.dumps(random_adapter(spec, seed=1), fp))
                assert acme.upload("t", path).version == 1
                assert acme.classify("t", TEXTS[0]).version == 1
        with serving_in_thread(tmp_path, tiny_dir[1], admin_key=ADMIN) as (url, _):  # a restart
            with sdk.Client(url, api_key=created.key) as acme:
                assert acme.classify("t", TEXTS[0]).version == 1  # key and task survived
            with sdk.Client(url, api_key=ADMIN) as root:
                root.revoke_key(created.id)
                with pytest.raises(sdk.KeyNotFound):
                    root.revoke_key(created.id)
                assert {k.id for k in root.keys()} == {other.id}
            with sdk.Client(url, api_key=created.key) as acme, pytest.raises(sdk.Unauthorized):
                acme.classify("t", TEXTS[0])  # effective at once
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("switchboard.sqlite3*"))
    for secret in (created.key, other.key, ADMIN):
        assert secret.encode() not in stored, "a secret reached the store"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (created.key, other.key, ADMIN):
        assert secret not in logged, "a secret reached the log"
    rows = sqlite3.connect(tmp_path / "switchboard.sqlite3").execute("SELECT hash FROM keys").fetchall()
    assert len(rows) == 2 and all(len(h) == 64 for (h,) in rows)  # SHA-256 hex only


def test_namespaces_share_blobs_but_never_tasks(tiny_dir, tmp_path):
    spec = tiny_dir[1].spec
    with serving_in_thread(tmp_path, tiny_dir[1], admin_key=ADMIN) as (url, state):
        fp = state.runtime.engine.spec.fingerprint
        same = native.dumps(random_adapter(spec, seed=3), fp)
        different = native.dumps(random_adapter(spec, seed=4), fp)
        for tenant, blob in (("a", same), ("b", same), ("c", different)):
            r = httpx.put(f"{url}/v1/tasks/sentiment", headers=admin(tenant), files=[("files", ("x.safetensors", blob))])
            assert r.status_code == 201 and r.json()["version"] == 1
        answers = {t: httpx.post(f"{url}/v1/classify", headers=admin(t), json={"task": "sentiment", "inputs": TEXTS[0],
                                                                               "raw_scores": True}).json()
                   for t in "abc"}
        assert answers["a"] == answers["b"] and answers["a"]["predictions"] != answers["c"]["predictions"]
        blobs = sorted(p.name for p in (tmp_path / "blobs").glob("*.safetensors"))
        assert len(blobs) == 2  # one per content, shared by a and b
        assert httpx.delete(f"{url}/v1/tasks/sentiment", headers=admin("b")).status_code == 204
        assert sorted(p.name for p in (tmp_path / "blobs").glob("*.safetensors")) == blobs  # a still needs it
        assert httpx.post(f"{url}/v1/classify", headers=admin("a"),
                          json={"task": "sentiment", "inputs": TEXTS[0], "raw_scores": True}).json() == answers["a"]
        assert httpx.post(f"{url}/v1/classify", headers=admin("b"),
                          json={"task": "sentiment", "inputs": "x"}).status_code == 404
        assert httpx.delete(f"{url}/v1/tasks/sentiment", headers=admin("a")).status_code == 204
        assert len(list((tmp_path / "blobs").glob("*.safetensors"))) == 1  # now unreferenced: gone


def test_storage_quotas_refuse_before_writing(tiny_dir, tmp_path):
    spec = tiny_dir[1].spec
    with serving_in_thread(tmp_path, tiny_dir[1], admin_key=ADMIN) as (url, state):
        fp = state.runtime.engine.spec.fingerprint
        small = random_adapter(spec, seed=5)
        blob = native.dumps(small, fp)
        quota = httpx.put(f"{url}/v1/tenants/q", headers=admin(), json={"max_tasks": 2,
                                                                       "max_adapter_bytes": small.nbytes * 3})
        assert quota.status_code == 200 and quota.json()["max_tasks"] == 2
        put = lambda task: httpx.put(f"{url}/v1/tasks/{task}", headers=admin("q"),  # noqa: E731
                                     files=[("files", ("x.safetensors", blob))])
        assert put("one").status_code == 201 and put("two").status_code == 201
        third = put("three")
        assert third.status_code == 507 and third.json()["error"]["type"] == "quota_exceeded"
        assert "max_tasks" in third.json()["error"]["message"]
        assert put("one").status_code == 201  # a new version of an existing task: 3 × bytes, at the limit
        over = put("two")
        assert over.status_code == 507 and "max_adapter_bytes" in over.json()["error"]["message"]
        usage = httpx.get(f"{url}/v1/tenants/q", headers=admin()).json()
        assert usage["usage"] == {"tasks": 2, "adapter_bytes": small.nbytes * 3, "queued_rows": 0}
        listed = httpx.get(f"{url}/v1/tasks", headers=admin("q")).json()["tasks"]
        assert sorted(t["task"] for t in listed) == ["one", "two"] and len(list((tmp_path / "blobs").iterdir())) == 1
        assert httpx.get(f"{url}/v1/tenants/nobody", headers=admin()).status_code == 404


def test_every_management_action_leaves_one_json_audit_line(tiny_dir, tmp_path, caplog):
    spec = tiny_dir[1].spec
    with caplog.at_level(logging.INFO, logger="switchboard.audit"):
        with serving_in_thread(tmp_path, tiny_dir[1], admin_key=ADMIN) as (url, state):
            fp = state.runtime.engine.spec.fingerprint
            key = httpx.post(f"{url}/v1/keys", headers=admin(), json={"tenant": "aud", "scopes": ["manage"]}).json()
            blob = native.dumps(random_adapter(spec, seed=6), fp)
            httpx.put(f"{url}/v1/tasks/t", headers=bearer(key["key"]), files=[("files", ("x.safetensors", blob))])
            httpx.post(f"{url}/v1/tasks/t/rollback", headers=bearer(key["key"]), json={"version": 7})
            httpx.delete(f"{url}/v1/tasks/t", headers=bearer("sb_wrong"))
            httpx.delete(f"{url}/v1/tasks/t", headers=bearer(key["key"]))
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "switchboard.audit"]
    summary = [(line["action"], line["tenant"], line["key_id"], line["task"], line["version"], line["outcome"])
               for line in lines]
    assert summary == [
        ("POST /v1/keys", "default", "admin", None, None, "ok"),
        ("PUT /v1/tasks/{task}", "aud", key["id"], "t", 1, "ok"),
        ("POST /v1/tasks/{task}/rollback", "aud", key["id"], "t", None, "refused: version_not_found"),
        ("DELETE /v1/tasks/{task}", None, None, "t", None, "denied: unauthorized"),
        ("DELETE /v1/tasks/{task}", "aud", key["id"], "t", None, "ok"),
    ]
    assert all(line["time"] for line in lines)
    assert key["key"] not in json.dumps(lines)


def test_a_data_directory_from_before_tenants_is_migrated_to_default(tiny_dir, tmp_path):
    spec = tiny_dir[1].spec
    adapter = random_adapter(spec, seed=7)
    old = tmp_path / "old"
    (old / "blobs").mkdir(parents=True)
    blob = native.dumps(adapter, spec.fingerprint)
    sha = adapter.content_hash()
    (old / "blobs" / f"{sha}.safetensors").write_bytes(blob)
    db = sqlite3.connect(old / "switchboard.sqlite3")
    db.executescript("""
        CREATE TABLE versions (task TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL, kind TEXT NOT NULL,
            labels TEXT NOT NULL, params INTEGER NOT NULL, bytes INTEGER NOT NULL, created_at REAL NOT NULL,
            PRIMARY KEY (task, version));
        CREATE TABLE tasks (task TEXT PRIMARY KEY, current INTEGER, next_version INTEGER NOT NULL);""")
    db.execute("INSERT INTO versions VALUES ('legacy', 3, ?, 'ia3', ?, 1, 1, 0)", (sha, json.dumps(adapter.labels)))
    db.execute("INSERT INTO tasks VALUES ('legacy', 3, 4)")
    db.commit()
    db.close()
    with serving_in_thread(old, tiny_dir[1]) as (url, _):  # open mode: tenant default
        r = httpx.post(f"{url}/v1/classify", json={"task": "legacy", "inputs": TEXTS[0]})
        assert r.status_code == 200 and r.json()["version"] == 3
        assert httpx.put(f"{url}/v1/tasks/legacy", files=[("files", ("x.safetensors", blob))]).json()["version"] == 4
    assert sqlite3.connect(old / "switchboard.sqlite3").execute("PRAGMA user_version").fetchone()[0] == 2


def test_open_mode_is_refused_off_loopback():
    assert open_mode_refusal("127.0.0.1", False, False) is None
    assert open_mode_refusal("::1", False, False) is None and open_mode_refusal("localhost", False, False) is None
    assert open_mode_refusal("0.0.0.0", True, False) is None  # auth mode
    assert open_mode_refusal("0.0.0.0", False, True) is None  # explicitly allowed
    assert "SWITCHBOARD_ADMIN_KEY" in open_mode_refusal("0.0.0.0", False, False)
    r = subprocess.run([sys.executable, "-m", "switchboard.clients.cli", "serve", "--host", "0.0.0.0", "--port",
                        str(free_port())], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    assert r.returncode == 1 and "SWITCHBOARD_ADMIN_KEY" in r.stderr and "--allow-unauthenticated" in r.stderr


def test_cli_keys_create_list_revoke(tiny_dir, tmp_path, capsys, monkeypatch):
    with serving_in_thread(tmp_path, tiny_dir[1], admin_key=ADMIN) as (url, _):
        monkeypatch.setenv("SWITCHBOARD_ADMIN_KEY", ADMIN)
        assert main(["keys", "create", "cli-tenant", "--scopes", "classify,manage", "--url", url, "--json"]) == 0
        created = json.loads(capsys.readouterr().out)
        assert created["tenant"] == "cli-tenant" and created["scopes"] == ["classify", "manage"] and created["key"]
        assert main(["keys", "list", "--url", url, "--json"]) == 0
        assert [k["id"] for k in json.loads(capsys.readouterr().out)["keys"]] == [created["id"]]
        assert main(["tasks", "--url", url, "--api-key", created["key"], "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {"tasks": []}
        assert main(["keys", "revoke", created["id"], "--url", url]) == 0
        capsys.readouterr()
        assert main(["tasks", "--url", url, "--api-key", created["key"]]) == 1
        err = capsys.readouterr().err
        assert "unauthorized" in err and "SWITCHBOARD_API_KEY" in err


def test_a_throttled_tenant_is_refused_before_its_body_is_read(tiny_dir, tmp_path):
    with serving_in_thread(tmp_path, tiny_dir[1], admin_key=ADMIN) as (url, state):
        state.runtime.batcher._throttled["flood"] = (float("inf"), 3)  # as after a refusal for its own demand
        garbage = {"content": b"{not json", "headers": {"content-type": "application/json"}}
        refused = httpx.post(f"{url}/v1/classify", **garbage | {"headers": garbage["headers"] | admin("flood")})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "3"
        assert refused.json()["error"]["type"] == "overloaded"  # the body was never parsed
        other = httpx.post(f"{url}/v1/classify", **garbage | {"headers": garbage["headers"] | admin("calm")})
        assert other.status_code == 422, other.text  # another tenant's request takes the full path (JSON error)
        nokey = httpx.post(f"{url}/v1/classify", json={"task": "t", "inputs": "x"})
        assert nokey.status_code == 401  # the fast path never answers for an unauthenticated caller
