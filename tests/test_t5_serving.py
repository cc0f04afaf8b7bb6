"""A T5 backbone served end to end: `switchboard serve --model T5_DIR`, a PEFT T5 (IA)3 adapter turned
into a task by `switchboard tfew-task`, answered over HTTP with PEFT's own rank scores; a server-side
T-Few job; a bare PEFT T5 adapter refused with a message that names the fix."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from switchboard.clients import sdk
from switchboard.server.core.backbone import default_model_path
from tests.factories import TEXTS
from tests.server_fixture import running_server
from tests.test_t5_rank import _oracle_scores, _peft_t5, tiny_t5

CHOICES, TEMPLATE = ["positive", "negative"], "{text} Is this review positive or negative?"


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-t5")
    tiny_t5().save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(t5_dir, tmp_path_factory):
    with running_server(t5_dir, tmp_path_factory.mktemp("data"), env={"SWITCHBOARD_PRECISION": "fp32"}) as (url, _):
        yield url


def test_a_peft_t5_adapter_with_its_choices_answers_with_peft_rank_scores(server, t5_dir, tmp_path):
    assert httpx.get(f"{server}/v1/backbone").json()["family"] == "t5"
    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    model = _peft_t5(seed=5)
    model.save_pretrained(tmp_path / "peft")
    files = [("files", (name, (tmp_path / "peft" / name).read_bytes()))
             for name in ("adapter_config.json", "adapter_model.safetensors")]
    bare = httpx.put(f"{server}/v1/tasks/bare", files=files)
    assert bare.status_code == 422 and "tfew-task" in bare.json()["error"]["message"]
    labelled = httpx.put(f"{server}/v1/tasks/bare", files=files, data={"labels": '["a", "b"]'})
    assert labelled.status_code == 422 and "tfew-task" in labelled.json()["error"]["message"]
    out = tmp_path / "task.safetensors"
    done = subprocess.run([sys.executable, "-m", "switchboard.clients.cli", "tfew-task", str(tmp_path / "peft"),
                           "--model", str(t5_dir), "--choices", ",".join(CHOICES), "--template", TEMPLATE,
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    put = httpx.put(f"{server}/v1/tasks/sentiment", files=[("files", ("task.safetensors", out.read_bytes()))])
    assert put.status_code == 201, put.text
    answer = httpx.post(f"{server}/v1/classify", json={"task": "sentiment", "inputs": TEXTS[:3],
                                                        "raw_scores": True}).json()
    for text, row in zip(TEXTS[:3], answer["predictions"]):
        want = _oracle_scores(model, tokenizer, text, CHOICES, TEMPLATE)
        got = torch.tensor([{p["label"]: p["score"] for p in row}[c] for c in CHOICES])
        assert (got - want).abs().max().item() <= 1e-4


def test_a_t_few_job_on_the_server(server):
    examples = [(f"the {w} ran quickly", "positive") for w in ("dog", "cat", "fox")] + \
               [(f"a {w} sat still", "negative") for w in ("dog", "cat", "fox")]
    with sdk.Client(server) as client:
        job = client.train("moved", examples, steps=20, batch_size=4, lr=3e-2, choices=CHOICES, template=TEMPLATE)
        job = client.wait_for_job(job.id, timeout=180, poll=0.2)
        assert job.status == "succeeded", job.error
        assert job.result["kind"] == "ia3" and sorted(job.result["labels"]) == sorted(CHOICES)
        assert {p.label for p in client.classify("moved", ["a bird flew"]).predictions[0]} == set(CHOICES)
    body = {"examples": [{"text": t, "label": lb} for t, lb in examples]}
    refused = httpx.post(f"{server}/v1/tasks/x/train", json=body)
    assert refused.status_code == 422 and "choices" in refused.json()["error"]["message"]
    # what the job's process would refuse later is refused at submission, before any job exists
    for extra, needle in (({"template": "{text} " + "word " * 80}, "at most 64 tokens"),
                          ({"template": "{text} and {text}"}, "exactly once"),
                          ({"choices": ["positive", "negative", "positive "]}, "tokenize the same")):
        bad = httpx.post(f"{server}/v1/tasks/x/train", json={**body, "choices": CHOICES, **extra})
        assert bad.status_code == 422 and needle in bad.json()["error"]["message"], bad.text
    assert httpx.get(f"{server}/v1/tasks/x").status_code == 404
