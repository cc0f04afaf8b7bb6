"""The request path's pieces against their oracles: the TextEncoder against the tokenizer's own call,
the encode stage's scores against a float64 softmax, the front link's frames, the merged /metrics,
and the device's batch defaults."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from switchboard.server.core.tokenize import TextEncoder, tokenize
from switchboard.server.http.pipeline import predictions
from switchboard.server.metrics import MergedRegistry
from switchboard.server.runtime import device_defaults
from switchboard.server.runtime.front_link import _ANSWER, _ENCODER, _JOB
from switchboard.server.runtime.serving import Answer, Job, TaskAnswer
from switchboard.server.settings import Settings

TEXTS = ["hello world", "Ünïcödé — text with emoji 🎉 and  double  spaces", "x " * 700, "short", "A" * 3000,
         "mixed CASE and punctuation!? (yes) [no] {maybe}", "日本語のテキスト", "\t tabs\nand newlines \r\n"]


@pytest.mark.parametrize("max_length", [8, 32, 512])
def test_text_encoder_equals_the_tokenizer_call(tiny, max_length):
    from switchboard.server.core.backbone import load_backbone

    for tokenizer in (tiny.tokenizer, load_backbone().tokenizer):
        encoder = TextEncoder(tokenizer, max_length)
        for texts in (TEXTS, TEXTS[:1], TEXTS[2:3], TEXTS[::-1]):
            got, want = encoder(texts), tokenize(tokenizer, texts, max_length)
            assert got[0].shape == want[0].shape and got[0].dtype == np.int64
            assert (got[0] == want[0]).all() and (got[1] == want[1]).all()


def test_scores_are_the_float64_softmax_and_always_finite():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 7)).astype(np.float32)
    labels = [f"l{i}" for i in range(4)]
    want = torch.softmax(torch.from_numpy(logits[:, :4]).double(), -1).numpy()
    got = predictions(logits, labels, raw=False, top_k=None)
    for row, preds in enumerate(got):
        assert [p["score"] for p in preds] == sorted((p["score"] for p in preds), reverse=True)
        for p in preds:
            assert abs(p["score"] - want[row, labels.index(p["label"])]) < 1e-12
    top = predictions(logits, labels, raw=True, top_k=2)
    assert all(len(p) == 2 for p in top) and top[0][0]["score"] == float(logits[0, :4].max())
    bad = np.array([[np.nan, np.inf, -np.inf, 1.0]], dtype=np.float32)
    for raw in (True, False):
        scores = [p["score"] for p in predictions(bad, labels, raw=raw, top_k=None)[0]]
        assert all(math.isfinite(s) for s in scores)


def test_front_link_frames_carry_arrays_exactly():
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    job = Job("acme", ["a", "b"], ids, np.ones_like(ids), 30.0, "Bearer k", None)
    back = _JOB.decode(_ENCODER.encode(job))
    assert back.tenant == "acme" and back.tasks == ["a", "b"] and (back.input_ids == ids).all()
    logits = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    answer = _ANSWER.decode(_ENCODER.encode(Answer(logits, [TaskAnswer(2, ["x", "y", "z"])])))
    assert answer.logits.dtype == np.float32 and (answer.logits == logits).all()
    assert answer.tasks[0].version == 2


def test_merged_metrics_sum_every_process():
    def registry(n: int) -> CollectorRegistry:
        r = CollectorRegistry()
        c = Counter("switchboard_requests", "r", ["endpoint"], registry=r)
        h = Histogram("switchboard_request_duration_seconds", "d", buckets=(0.1, 1.0), registry=r)
        for _ in range(n):
            c.labels("POST /v1/classify").inc()
            h.observe(0.05)
        return r

    own, front = registry(3), registry(4)
    Counter("process_fake", "only the scheduler's own", registry=front).inc()
    text = generate_latest(MergedRegistry(own, [generate_latest(front)])).decode()
    samples = {s.name + str(sorted(s.labels.items())): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["switchboard_requests_total[('endpoint', 'POST /v1/classify')]"] == 7
    assert samples["switchboard_request_duration_seconds_count[]"] == 7
    assert samples["switchboard_request_duration_seconds_bucket[('le', '0.1')]"] == 7
    assert not any(k.startswith("process_fake") for k in samples)


def test_batch_defaults_follow_the_device_unless_set(monkeypatch):
    cpu = Settings()
    assert device_defaults.for_device(cpu, torch.device("cpu")) is cpu
    gpu = device_defaults.for_device(Settings(), torch.device("cuda"))
    assert (gpu.max_batch_rows, gpu.max_batch_tokens, gpu.chunk_rows) == (256, 65_536, 0)
    monkeypatch.setenv("SWITCHBOARD_CHUNK_ROWS", "16")
    explicit = device_defaults.for_device(Settings(max_batch_rows=32), torch.device("cuda"))
    assert (explicit.max_batch_rows, explicit.max_batch_tokens, explicit.chunk_rows) == (32, 65_536, 16)
