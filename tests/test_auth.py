"""Every route × every kind of caller, against the rule table (DESIGN.md §9). A route without a rule
fails this test: adding one means deciding who may call it."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx
import pytest

from switchboard.adapter_store.formats import native
from tests.factories import random_adapter
from tests.server_fixture import serving_in_thread

ADMIN = "admin-secret-for-tests"
EXAMPLES = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]

# (method, path) → (rule, request kwargs, status on success). Paths name A's objects: task t-a,
# job (created below), key k (created below), tenant tenant-a.
ROUTES: dict[tuple[str, str], tuple[str, dict, int]] = {
    ("GET", "/health"): ("public", {}, 200),
    ("GET", "/metrics"): ("public", {}, 200),
    ("GET", "/v1/backbone"): ("classify", {}, 200),
    ("POST", "/v1/classify"): ("classify", {"json": {"task": "t-a", "inputs": "x"}}, 200),
    ("POST", "/v1/embed"): ("classify", {"json": {"inputs": "x"}}, 200),
    ("POST", "/v1/rerank"): ("classify", {"json": {"task": "t-a", "query": "q", "documents": ["d"]}}, 200),
    ("PUT", "/v1/tasks/{task}"): ("manage", {"files": "adapter"}, 201),
    ("GET", "/v1/tasks"): ("manage", {}, 200),
    ("GET", "/v1/tasks/{task}"): ("manage", {}, 200),
    ("DELETE", "/v1/tasks/{task}"): ("manage", {}, 204),
    ("POST", "/v1/tasks/{task}/rollback"): ("manage", {"json": {"version": 1}}, 200),
    ("POST", "/v1/tasks/{task}/train"): ("manage", {"json": {"examples": EXAMPLES, "steps": 1}}, 202),
    ("GET", "/v1/jobs"): ("manage", {}, 200),
    ("GET", "/v1/jobs/{job_id}"): ("manage", {}, 200),
    ("DELETE", "/v1/jobs/{job_id}"): ("manage", {}, 200),
    ("POST", "/v1/keys"): ("admin", {"json": {"tenant": "tenant-c", "scopes": ["classify"]}}, 201),
    ("GET", "/v1/keys"): ("admin", {}, 200),
    ("DELETE", "/v1/keys/{key_id}"): ("admin", {}, 204),
    ("PUT", "/v1/tenants/{tenant}"): ("admin", {"json": {"max_tasks": 50}}, 200),
    ("GET", "/v1/tenants/{tenant}"): ("admin", {}, 200),
    ("GET", "/v1/residency"): ("admin", {}, 200),
}
CALLERS = ["none", "bad", "revoked", "expired", "classify_a", "manage_b", "admin"]


def expected(rule: str, caller: str, path: str) -> set[int]:
    if rule == "public":
        return {200}
    if caller in ("none", "bad", "revoked", "expired"):
        return {401}
    if caller == "admin":
        return {"ok"}  # type: ignore[arg-type]
    if rule == "admin":
        return {403}
    if caller == "classify_a":
        return {"ok"} if rule == "classify" else {403}  # type: ignore[arg-type]
    # manage_b holds both scopes of tenant B: A's objects do not exist for it; B may create its own
    # task of the same name (PUT, train)
    if path in ("/v1/tasks", "/v1/jobs", "/v1/backbone", "/v1/embed"):
        return {"ok"}  # type: ignore[arg-type]
    if path in ("/v1/tasks/{task}", "/v1/tasks/{task}/train") and rule == "manage":
        return {"ok", 404}  # type: ignore[arg-type]  # PUT/train make B's own task; GET/DELETE: 404
    return {404}


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    # the matrix writes the store ~600 times; on tmpfs its fsyncs cost nothing (durability is tested elsewhere)
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as data, \
            serving_in_thread(Path(data), tiny_dir[1], model=tiny_dir[0], admin_key=ADMIN, max_queued_jobs=100,
                              train_max_seconds=0.5) as (url, state):
        yield url, state


def keys_for(url: str) -> dict[str, str | None]:
    admin = {"Authorization": f"Bearer {ADMIN}"}

    def create(tenant: str, scopes: list[str], **extra) -> str:
        r = httpx.post(f"{url}/v1/keys", headers=admin, json={"tenant": tenant, "scopes": scopes, **extra})
        assert r.status_code == 201, r.text
        return r.json()["key"]

    revoked = httpx.post(f"{url}/v1/keys", headers=admin, json={"tenant": "tenant-a", "scopes": ["classify"]}).json()
    assert httpx.delete(f"{url}/v1/keys/{revoked['id']}", headers=admin).status_code == 204
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
    expired = create("tenant-a", ["classify", "manage"], expires_at=soon)
    keys = {"none": None, "bad": "sb_not-a-key", "revoked": revoked["key"], "expired": expired,
            "classify_a": create("tenant-a", ["classify"]), "manage_b": create("tenant-b", ["classify", "manage"]),
            "admin": ADMIN}
    time.sleep(2.1)
    return keys


def test_every_route_of_the_openapi_document_has_a_rule(server):
    url, _ = server
    spec = httpx.get(f"{url}/openapi.json").json()
    routes = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert routes == set(ROUTES), f"routes without a rule: {routes - set(ROUTES)}; stale rules: {set(ROUTES) - routes}"


def test_the_route_by_key_matrix(server, tiny_dir):
    url, state = server
    keys = keys_for(url)
    admin_a = {"Authorization": f"Bearer {ADMIN}", "X-Switchboard-Tenant": "tenant-a"}
    fp = state.runtime.engine.spec.fingerprint
    blob = native.dumps(random_adapter(tiny_dir[1].spec, seed=1, num_labels=2), fp)  # a pair task too: rerank
    admin_b = {"Authorization": f"Bearer {ADMIN}", "X-Switchboard-Tenant": "tenant-b"}
    job = httpx.post(f"{url}/v1/tasks/t-a/train", headers=admin_a, json={"examples": EXAMPLES, "steps": 1}).json()
    results: dict[tuple[str, str, str], int] = {}
    client = httpx.Client(timeout=30)  # one keep-alive connection for the ~600 calls of the table
    for (method, path), (rule, kwargs, ok) in ROUTES.items():
        for caller in CALLERS:
            # fresh objects for each call, so a DELETE or a revocation cannot spoil the next cell
            put = client.put(f"{url}/v1/tasks/t-a", headers=admin_a, files=[("files", ("a.safetensors", blob))])
            assert put.status_code == 201
            client.delete(f"{url}/v1/tasks/t-a", headers=admin_b)  # B has no t-a of its own
            key = client.post(f"{url}/v1/keys", headers=admin_a, json={"tenant": "tenant-a", "scopes": ["classify"]})
            concrete = path.format(task="t-a", job_id=job["id"], key_id=key.json()["id"], tenant="tenant-a")
            headers = {} if keys[caller] is None else {"Authorization": f"Bearer {keys[caller]}"}
            if caller == "admin":
                headers["X-Switchboard-Tenant"] = "tenant-a"
            request = dict(kwargs)
            if path.endswith("/rollback"):
                request["json"] = {"version": put.json()["version"]}
            if request.get("files") == "adapter":
                request["files"] = [("files", ("a.safetensors", blob))]
            r = client.request(method, f"{url}{concrete}", headers=headers, **request)
            results[(method, path, caller)] = r.status_code
            allowed = {ok if s == "ok" else s for s in expected(rule, caller, path)}
            assert r.status_code in allowed, (method, path, caller, r.status_code, r.text[:300])
            if r.status_code == 401:
                assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"]["type"] == "unauthorized"
            if r.status_code == 403:
                assert r.json()["error"]["type"] == "forbidden"
    client.close()
    # the table really exercised every cell
    assert len(results) == len(ROUTES) * len(CALLERS)


def test_another_tenants_task_is_indistinguishable_from_a_missing_one(server, tiny_dir):
    url, state = server
    admin = {"Authorization": f"Bearer {ADMIN}"}
    fp = state.runtime.engine.spec.fingerprint
    blob = native.dumps(random_adapter(tiny_dir[1].spec, seed=2), fp)
    key_a = httpx.post(f"{url}/v1/keys", headers=admin, json={"tenant": "iso-a", "scopes": ["classify", "manage"]})
    key_b = httpx.post(f"{url}/v1/keys", headers=admin, json={"tenant": "iso-b", "scopes": ["classify", "manage"]})
    a = {"Authorization": f"Bearer {key_a.json()['key']}"}
    b = {"Authorization": f"Bearer {key_b.json()['key']}"}
    assert httpx.put(f"{url}/v1/tasks/secret", headers=a, files=[("files", ("a.safetensors", blob))]).status_code == 201
    for method, path, body in [("POST", "/v1/classify", {"task": "{t}", "inputs": "x"}),
                               ("GET", "/v1/tasks/{t}", None), ("DELETE", "/v1/tasks/{t}", None),
                               ("POST", "/v1/tasks/{t}/rollback", {"version": 1})]:
        answers = []
        for task in ("secret", "never-existed"):
            kwargs = {"json": {k: v.format(t=task) if isinstance(v, str) else v for k, v in body.items()}} if body else {}
            r = httpx.request(method, url + path.format(t=task), headers=b, **kwargs)
            answers.append((r.status_code, r.json()["error"]["type"], r.json()["error"]["message"].replace(task, "T")))
        assert answers[0] == answers[1] and answers[0][0] == 404, answers
    assert [t["task"] for t in httpx.get(f"{url}/v1/tasks", headers=b).json()["tasks"]] == []
    assert httpx.post(f"{url}/v1/classify", headers=a, json={"task": "secret", "inputs": "x"}).status_code == 200
