"""Few-shot training jobs on a real server (tiny model): the job trains exactly what the local trainer
trains, registers it as the next version, runs in a niced child process, can be cancelled, keeps
serving other tasks meanwhile, and bad requests change nothing."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest
import torch

from switchboard.adapter_store.formats import native
from switchboard.clients import sdk
from switchboard.server.core.engine import Engine
from switchboard.server.errors import Overloaded
from switchboard.server.metrics import Metrics
from switchboard.server.runtime.training.jobs import JobNotFound, JobRunner, JobSpec
from switchboard.server.runtime.training.trainer import TrainConfig, train
from tests.factories import TEXTS, tiny_backbone
from tests.server_fixture import metric_samples, running_server, serving_in_thread, upload
from tests.test_train import synthetic

ENV = {"SWITCHBOARD_MAX_TRAIN_EXAMPLES": "200", "SWITCHBOARD_MAX_TRAIN_STEPS": "5000",
       "SWITCHBOARD_MAX_QUEUED_JOBS": "1", "SWITCHBOARD_MAX_TRAIN_BODY_BYTES": "60000"}


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    with running_server(tiny_dir[0], tmp_path_factory.mktemp("data"), env=ENV) as (url, proc):
        yield url, proc


def _wait(client: sdk.Client, job_id: str, until, timeout: float = 120.0) -> sdk.Job:
    deadline = time.monotonic() + timeout
    while not until(job := client.job(job_id)):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    return job


def test_job_trains_what_the_local_trainer_trains_and_registers_it(server, tiny_dir, adapters):
    url, _ = server
    examples, eval_set = synthetic(12, seed=1), synthetic(4, seed=99)
    with sdk.Client(url) as client:
        fp = client.backbone()["fingerprint"]
        assert upload(url, "other", adapters["task-1"], fp).status_code == 201
        started = client.train("sections", examples, eval_set, steps=40, lr=1e-2, batch_size=8, seed=3)
        assert started.status in ("queued", "running") and started.total_steps == 40
        # serving goes on while the job trains: the other task answers as before
        for _ in range(5):
            assert client.classify("other", TEXTS[:3]).version == 1
        job = client.wait_for_job(started.id, timeout=180, poll=0.2)
    assert job.status == "succeeded", job.error
    assert (job.step, job.result["version"], job.result["kind"]) == (40, 1, "ia3")
    assert job.result["evaluated_on"] == "eval_examples" and job.result["labels"] == sorted({lb for _, lb in examples})

    # Oracle: the local trainer, same data and recipe, one thread like the job's process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(kind="ia3", steps=40, lr=1e-2, batch_size=8, seed=3)
        local, report = train(tiny_backbone(seed=7), examples, cfg, eval_set, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert job.result["accuracy"] == pytest.approx(report["accuracy"])
    engine = Engine(tiny_dir[1])
    slot = engine.load(native.loads(native.dumps(local, fp), fp)).slot
    texts = [t for t, _ in eval_set]
    enc = engine.tokenize(texts)
    expected = engine.forward(enc["input_ids"], enc["attention_mask"], torch.full((len(texts),), slot))
    served = httpx.post(f"{url}/v1/classify", json={"task": "sections", "inputs": texts, "raw_scores": True}).json()
    assert served["version"] == 1
    for row, logits in zip(served["predictions"], expected):
        got = {p["label"]: p["score"] for p in row}
        assert [got[label] for label in local.labels] == pytest.approx(logits.tolist(), abs=1e-4)
    samples = metric_samples(url)
    assert samples['switchboard_train_jobs_total{"outcome": "succeeded"}'] >= 1
    assert samples["switchboard_train_jobs_active"] == 0


def test_cancel_kills_the_niced_child_and_registers_nothing(server):
    url, proc = server
    server_proc = psutil.Process(proc.pid)
    with sdk.Client(url) as client:
        long = client.train("never", synthetic(10, seed=2), steps=5000)
        queued = client.train("never-2", synthetic(10, seed=3), steps=10)
        with pytest.raises(sdk.Overloaded) as full:  # max_queued_jobs=1
            client.train("never-3", synthetic(10, seed=4), steps=10)
        assert full.value.status == 429 and full.value.retry_after
        _wait(client, long.id, lambda j: j.step > 0)
        children = [c for c in server_proc.children(recursive=True) if c.nice() == 19]
        assert children, "the training process runs at nice 19"
        assert all(os.sched_getscheduler(c.pid) == os.SCHED_IDLE for c in children)
        assert client.cancel_job(queued.id).status == "cancelled"
        client.cancel_job(long.id)
        assert _wait(client, long.id, lambda j: j.done).status == "cancelled"
        psutil.wait_procs(children, timeout=15)
        assert not any(c.is_running() for c in children)
        names = {t.task for t in client.tasks()}
        assert not names & {"never", "never-2", "never-3"}
        with pytest.raises(sdk.JobNotFound):
            client.job("no-such-job")


@pytest.mark.parametrize("body, status, needle", [
    ({"examples": [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]}, 422, "two distinct labels"),
    ({"examples": []}, 422, "examples"),
    ({"examples": [{"text": "", "label": "x"}, {"text": "b", "label": "y"}]}, 422, "text"),
    ({"examples": [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], "steps": 9999}, 422, "steps"),
    ({"examples": [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}],
      "eval_examples": [{"text": "c", "label": "z"}]}, 422, "absent"),
    ({"examples": [{"text": f"t{i}", "label": str(i % 2)} for i in range(201)]}, 413, "at most 200"),
    ({"examples": [{"text": "x" * 70000, "label": "x"}, {"text": "b", "label": "y"}]}, 413, "over 60000 bytes"),
])
def test_bad_training_requests_change_nothing(server, body, status, needle):
    url, _ = server
    before = httpx.get(f"{url}/v1/jobs").json()["jobs"]
    r = httpx.post(f"{url}/v1/tasks/bad-job/train", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/jobs").json()["jobs"] == before
    assert httpx.get(f"{url}/v1/tasks/bad-job").status_code == 404


def test_bad_task_name_is_refused(server):
    url, _ = server
    body = {"examples": [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]}
    assert httpx.post(f"{url}/v1/tasks/-bad/train", json=body).status_code == 422


@pytest.mark.slow  # a subprocess server on its own: in `pytest -m slow` (CI runs it)
def test_a_killed_server_takes_its_training_process_with_it(tiny_dir, tmp_path):
    """SIGKILL leaves no orphan trainer: the child's next progress message hits a closed pipe."""
    with running_server(tiny_dir[0], tmp_path, env=ENV) as (url, proc):
        with sdk.Client(url) as client:
            job = client.train("orphan", synthetic(10, seed=2), steps=5000)
            _wait(client, job.id, lambda j: j.step > 0)
        children = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, alive


@pytest.mark.parametrize("limits, needle", [
    ({"train_max_memory_bytes": 700 << 20}, "memory limit"),  # the child cannot even load its libraries
    ({"train_max_seconds": 2.0}, "wall-time limit"),
])
def test_a_job_past_its_sandbox_fails_clearly_and_the_server_is_untouched(tiny_dir, tmp_path, adapters, limits,
                                                                         needle):
    with serving_in_thread(tmp_path, tiny_dir[1], model=tiny_dir[0], **limits) as (url, state):
        fp = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
        assert upload(url, "other", adapters["task-1"], fp).status_code == 201
        with sdk.Client(url) as client:
            job = client.train("boxed", synthetic(10, seed=2), steps=2000)
            done = _wait(client, job.id, lambda j: j.done, timeout=120)
            assert done.status == "failed" and needle in done.error, done.error
            assert client.classify("other", TEXTS[:2]).version == 1
            assert "boxed" not in {t.task for t in client.tasks()}
        assert state.runtime.batcher.running


def test_queue_share_and_finished_records_are_per_tenant_in_the_runner():
    """The runner on its own (its worker not started, so jobs stay queued): a tenant at its share is
    refused while others are not; the overall cap is reached only by several tenants; each tenant keeps
    its own last finished jobs, and past the overall allowance the tenant keeping most loses its oldest."""
    runner = JobRunner(lambda *a: {}, Metrics(), None, None, max_queued=5, keep_finished=6, tenant_max_queued=2,
                       tenant_keep_finished=4)
    spec = JobSpec(examples=[("a", "x"), ("b", "y")])
    a = [runner.submit("a", "t", spec) for _ in range(2)]
    with pytest.raises(Overloaded, match="tenant_max_queued_jobs"):
        runner.submit("a", "t", spec)
    runner.submit("b", "t", spec)
    runner.submit("b", "t", spec)
    runner.submit("c", "t", spec)  # five queued: the overall cap, reached by three tenants
    with pytest.raises(Overloaded, match="max_queued_jobs"):
        runner.submit("d", "t", spec)
    for job in a:
        runner.cancel("a", job.id)
    runner.submit("d", "t", spec)  # room again overall
    kept_b, other_b = runner.list("b")
    runner.cancel("b", kept_b.id)
    runner.cancel("b", other_b.id)
    for _ in range(50):  # a's churn: only a's own records go
        runner.cancel("a", runner.submit("a", "t", spec).id)
    assert len(runner.list("a")) == 4 and len(runner.list("b")) == 2
    assert runner.get("b", kept_b.id).status == "cancelled"
    with pytest.raises(JobNotFound):
        runner.get("a", a[0].id)
    for tenant in "efg":  # past 6 finished overall: the tenant keeping the most (a) gives way
        runner.cancel(tenant, runner.submit(tenant, "t", spec).id)
    assert [len(runner.list(t)) for t in "abefg"] == [1, 2, 1, 1, 1]
    runner.cancel("h", runner.submit("h", "t", spec).id)  # now b keeps the most: b's oldest goes
    assert runner.list("b") == [other_b] and len(runner.list("h")) == 1
    assert len(runner.list("c")) == 1  # a queued job is never forgotten


TENANT_ADMIN = "an-admin-key-long-enough-for-any-check-of-its-length"


def test_one_tenant_can_neither_fill_the_job_queue_nor_evict_another_tenants_records(tiny_dir, tmp_path):
    """On a real server: tenant a at its queue share (tenant_max_queued_jobs, default 4) is refused
    while tenant b is not; a's 300 submit-and-cancel cycles leave b's finished job readable."""
    body = {"examples": [{"text": t, "label": lb} for t, lb in synthetic(5, seed=2)], "steps": 2000}

    def client(tenant: str) -> httpx.Client:
        return httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TENANT_ADMIN}",
                                                                "X-Switchboard-Tenant": tenant})

    with serving_in_thread(tmp_path, tiny_dir[1], model=tiny_dir[0], admin_key=TENANT_ADMIN) as (url, _):
        with client("a") as a, client("b") as b:
            first = a.post("/v1/tasks/long/train", json=body)  # keeps the one training slot busy
            assert first.status_code == 202, first.text
            statuses = [a.post("/v1/tasks/t/train", json=body).status_code for _ in range(6)]
            assert statuses.count(429) >= 1 and set(statuses) <= {202, 429}
            refused = a.post("/v1/tasks/t/train", json=body)
            assert refused.status_code == 429 and "tenant_max_queued_jobs" in refused.json()["error"]["message"]
            assert refused.headers["retry-after"]
            queued = [j for j in a.get("/v1/jobs").json()["jobs"] if j["status"] == "queued"]
            assert len(queued) == 4  # a's share of the 8 (max_queued_jobs)
            others = b.post("/v1/tasks/t/train", json=body)
            assert others.status_code == 202, others.text  # b is not refused for a's queue
            kept = b.delete(f"/v1/jobs/{others.json()['id']}").json()
            for job in queued:
                a.delete(f"/v1/jobs/{job['id']}")
            for _ in range(300):
                job = a.post("/v1/tasks/t/train", json=body)
                assert job.status_code == 202, job.text
                a.delete(f"/v1/jobs/{job.json()['id']}")
            mine = b.get(f"/v1/jobs/{kept['id']}")
            assert mine.status_code == 200 and mine.json()["status"] == "cancelled"
            assert len(a.get("/v1/jobs").json()["jobs"]) <= 64 + 1  # a's own last 64 finished, and its long job
            assert a.get(f"/v1/jobs/{queued[0]['id']}").status_code == 404  # a's oldest went
            a.delete(f"/v1/jobs/{first.json()['id']}")
            _wait_http(a, first.json()["id"])


def _wait_http(client: httpx.Client, job_id: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get(f"/v1/jobs/{job_id}").json()["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
