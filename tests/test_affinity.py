"""Task affinity through a real nginx (Debian's, started by the test) with the shipped
`deploy/nginx/nginx.conf` in front of two replicas on one real PostgreSQL: the SDK's
`X-Switchboard-Task` header makes every task live on exactly one replica, and when that replica dies
its tasks move to the other with no failed request (nginx retries the next upstream)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import httpx

from switchboard.adapter_store.formats import native
from switchboard.clients import Client
from switchboard.clients.local_services import free_port
from tests.factories import TEXTS, random_adapter
from tests.server_fixture import ROOT, metric_samples, serving_in_thread

ADMIN = "affinity-test-admin-key"
TASKS = [f"task-{i}" for i in range(10)]


def proxy_config(port: int, replicas: list[str]) -> str:
    text = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    assert "listen 8080;" in text and "replica-1:8000" in text and "replica-2:8000" in text
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    for name, url in zip(("replica-1:8000", "replica-2:8000"), replicas, strict=True):
        text = text.replace(name, url.removeprefix("http://"))
    return text


def resident(url: str) -> set[str]:
    r = httpx.get(f"{url}/v1/residency", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    return {v["task"] for v in r.json()["resident"]}


def test_each_task_is_served_by_one_replica_and_moves_when_it_dies(tiny_dir, tmp_path: Path, pg_url, nginx_proxy):
    spec = tiny_dir[1].spec
    with ExitStack() as stack:
        replicas, states, lifetimes = [], [], []
        for name in ("a", "b"):
            lifetime = stack.enter_context(ExitStack())  # closing it stops that replica
            url, state = lifetime.enter_context(serving_in_thread(tmp_path / name, tiny_dir[1], store=pg_url,
                                                                  admin_key=ADMIN))
            replicas.append(url)
            states.append(state)
            lifetimes.append(lifetime)
        port = free_port()
        proxy = nginx_proxy(proxy_config(port, replicas), port)
        fp = states[0].runtime.engine.spec.fingerprint
        with Client(proxy, api_key=ADMIN) as admin:
            key = admin.create_key("acme", ["classify", "manage"]).key
        with Client(proxy, api_key=key) as sb:
            for i, task in enumerate(TASKS):
                path = tmp_path / f"{task}.safetensors"
                path.write_bytes(native.dumps(random_adapter(spec, seed=i), fp))
                sb.upload(task, path)  # through the proxy: stored by the replica the task hashes to
            answers = {task: sb.classify(task, TEXTS[0]).predictions for task in TASKS}
            for i in range(200):
                task = TASKS[i % len(TASKS)]
                assert sb.classify(task, TEXTS[0]).predictions == answers[task]
        served = [metric_samples(url).get('switchboard_tenant_requests_total{"tenant": "acme"}', 0.0)
                  for url in replicas]
        assert sum(served) == 210 and min(served) > 0, served  # both replicas work
        on_a, on_b = resident(replicas[0]), resident(replicas[1])
        assert on_a | on_b == set(TASKS) and not on_a & on_b, (on_a, on_b)  # each task on exactly one replica

        # the replica holding the most tasks dies; nginx sends its tasks to the other, no request fails
        dying = 0 if len(on_a) >= len(on_b) else 1
        survivor = replicas[1 - dying]
        lifetimes[dying].close()  # its listening socket goes away: connection refused
        with Client(proxy, api_key=key) as sb:
            for i in range(100):
                task = TASKS[i % len(TASKS)]
                assert sb.classify(task, TEXTS[0]).predictions == answers[task]
        assert resident(survivor) == set(TASKS)

