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
