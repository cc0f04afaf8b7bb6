"""Training on pairs, the rerank objective and calibration: what is trained on pairs is served on pairs
with the trainer's own predictions; the fitted temperature is the one that generated the labels; served
probabilities use it and raw scores do not."""

from __future__ import annotations

import json
import random

import httpx
import numpy as np
import pytest
import torch

from switchboard.adapter_store.formats import native
from switchboard.clients.cli import main
from switchboard.server.core.engine import Engine
from switchboard.server.runtime.training.data import DataError, read_examples, read_rerank_examples
from switchboard.server.runtime.training.trainer import (
    TrainConfig,
    expected_calibration_error,
    fit_temperature,
    train,
)
from tests.factories import tiny_backbone
from tests.server_fixture import serving_in_thread, upload

TOPICS = {"games": ["chess", "arcade", "puzzle", "card", "board"], "net": ["dns", "http", "proxy", "router", "vpn"],
          "fonts": ["typeface", "glyph", "serif", "truetype", "bitmap"]}


def pairs(n: int, seed: int) -> list[tuple[tuple[str, str], str]]:
    """(query, passage) → same (same topic) or other."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    out = []
    for _ in range(n):
        a = rng.choice(names)
        b = a if rng.random() < 0.5 else rng.choice([x for x in names if x != a])
        query = " ".join(rng.choice(TOPICS[a]) for _ in range(2))
        passage = "a tool for " + " ".join(rng.choice(TOPICS[b]) for _ in range(4))
        out.append(((query, passage), "same" if a == b else "other"))
    return out


def test_a_pair_task_is_served_with_the_trainers_own_predictions():
    backbone = tiny_backbone(seed=3)
    cfg = TrainConfig(kind="houlsby", width=8, epochs=3, batch_size=16, seed=1, lr=1e-2, max_length=32)
    eval_set = pairs(24, seed=99)
    adapter, report = train(backbone, pairs(64, seed=1), cfg, eval_set, progress=False)
    blob = native.dumps(adapter, backbone.spec.fingerprint)
    engine = Engine(tiny_backbone(seed=3))
    slot = engine.load(native.loads(blob, backbone.spec.fingerprint)).slot
    enc = engine.tokenize([x for x, _ in eval_set], max_length=32)
    assert int(enc["attention_mask"].max()) == 2  # the pair encoding's second segment reached the engine
    served = engine.forward(enc["input_ids"], enc["attention_mask"], torch.full((len(eval_set),), slot))
    assert [adapter.labels[i] for i in served.argmax(-1).tolist()] == report["eval_predictions"]
    assert report["calibration"]["temperature"] == adapter.head.temperature


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    g = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(20_000, 4, generator=g)
    for true_t in (0.5, 2.0):
        y = torch.multinomial(torch.softmax(logits / true_t, -1), 1, generator=g).squeeze(1)
        assert fit_temperature(logits, y) == pytest.approx(true_t, rel=0.05)
        before = expected_calibration_error(torch.softmax(logits, -1), y)
        after = expected_calibration_error(torch.softmax(logits / fit_temperature(logits, y), -1), y)
        assert after < 0.02 < before


def test_calibration_is_skipped_on_a_handful_of_eval_examples_and_said():
    backbone = tiny_backbone(seed=3)
    cfg = TrainConfig(kind="ia3", epochs=1, batch_size=16, seed=1, max_length=32)
    adapter, report = train(backbone, pairs(32, seed=1), cfg, pairs(6, seed=2), progress=False)
    assert adapter.head.temperature == 1.0 and "at least 20" in report["calibration"]["skipped"]


def test_served_probabilities_use_the_temperature_and_raw_scores_do_not(tiny, tmp_path):
    from tests.factories import random_adapter

    hot = random_adapter(tiny.spec, seed=4, num_labels=3)
    hot.head.temperature = 2.5
    blob = native.dumps(hot, tiny.spec.fingerprint)
    assert native.loads(blob, tiny.spec.fingerprint).head.temperature == 2.5  # stored with the adapter
    with serving_in_thread(tmp_path, tiny) as (url, _):
        assert upload(url, "hot", hot, tiny.spec.fingerprint).status_code == 201
        body = {"task": "hot", "inputs": ["a chess engine", ["a query", "a passage"]]}
        raw = httpx.post(f"{url}/v1/classify", json={**body, "raw_scores": True}).json()["predictions"]
        probs = httpx.post(f"{url}/v1/classify", json=body).json()["predictions"]
    for raw_row, prob_row in zip(raw, probs, strict=True):
        logits = {p["label"]: p["score"] for p in raw_row}
        z = np.array(list(logits.values())) / 2.5
        want = dict(zip(logits, np.exp(z - z.max()) / np.exp(z - z.max()).sum(), strict=True))
        assert {p["label"]: p["score"] for p in prob_row} == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("value", ["nan", "inf", "0.0", "-1.", "1e9", "hot"])  # as long as "2.0": the header keeps its length
def test_a_broken_temperature_in_a_file_is_refused(tiny, value):
    from switchboard.server.core.adapter import AdapterValidationError
    from tests.factories import random_adapter

    adapter = random_adapter(tiny.spec, seed=4)
    adapter.head.temperature = 2.0
    blob = native.dumps(adapter, tiny.spec.fingerprint)
    forged = blob.replace(b'"temperature":"2.0"', b'"temperature":"' + value.encode() + b'"')
    assert forged != blob
    with pytest.raises(AdapterValidationError, match="temperature"):
        native.loads(forged, tiny.spec.fingerprint)


def test_pair_and_rerank_files(tmp_path):
    data = tmp_path / "pairs.csv"
    data.write_text("text,text_pair,label\nq1,p1,same\nq2,p2,other\n")
    assert read_examples(data) == [(("q1", "p1"), "same"), (("q2", "p2"), "other")]
    rerank = tmp_path / "rerank.jsonl"
    rerank.write_text(json.dumps({"query": "q", "positive": "p", "negatives": ["n1", "n2"]}) + "\n")
    assert read_rerank_examples(rerank) == [(("q", "p"), "relevant"), (("q", "n1"), "irrelevant"),
                                            (("q", "n2"), "irrelevant")]
    rerank.write_text(json.dumps({"query": "q", "positive": "p", "negatives": []}) + "\n")
    with pytest.raises(DataError, match="no negative"):
        read_rerank_examples(rerank)
    rerank.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    with pytest.raises(DataError, match="missing column"):
        read_rerank_examples(rerank)


def test_cli_trains_a_reranker_that_rerank_serves(tmp_path, tiny_dir):
    rng = random.Random(5)
    rows = []
    for _ in range(24):
        topic = rng.choice(sorted(TOPICS))
        others = [t for t in TOPICS if t != topic]
        rows.append({"query": " ".join(rng.sample(TOPICS[topic], 2)),
                     "positive": "a tool for " + " ".join(rng.sample(TOPICS[topic], 3)),
                     "negatives": ["a tool for " + " ".join(rng.sample(TOPICS[o], 3)) for o in others]})
    data = tmp_path / "rerank.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    assert main(["train", "--data", str(data), "--objective", "rerank", "--kind", "ia3", "--out", str(out),
                 "--model", str(tiny_dir[0]), "--epochs", "1", "--max-length", "32"]) == 0
    adapter = native.loads((out / "adapter.safetensors").read_bytes(), tiny_dir[1].spec.fingerprint)
    assert adapter.labels == ["irrelevant", "relevant"] and adapter.head.pooling == "pair"  # the pair default
    with serving_in_thread(tmp_path / "data", tiny_dir[1], model=tiny_dir[0]) as (url, _):
        r = httpx.put(f"{url}/v1/tasks/rel", files=[("files", ("a.safetensors",
                                                                (out / "adapter.safetensors").read_bytes()))])
        assert r.status_code == 201, r.text
        answer = httpx.post(f"{url}/v1/rerank", json={"task": "rel", "query": rows[0]["query"],
                                                      "documents": [rows[0]["positive"], *rows[0]["negatives"]]})
        assert answer.status_code == 200 and len(answer.json()["results"]) == 3


def test_a_job_with_pairs_is_bounded_and_refuses_a_mix(tiny, tmp_path):
    """Both texts of a pair count against max_train_text_chars; pairs and single texts do not mix."""
    with serving_in_thread(tmp_path, tiny, max_train_text_chars=100) as (url, _):
        mixed = {"examples": [{"text": "a", "text_pair": "b", "label": "x"}, {"text": "c", "label": "y"}],
                 "steps": 1}
        r = httpx.post(f"{url}/v1/tasks/p/train", json=mixed)
        assert r.status_code == 422 and "mix of pairs" in r.json()["error"]["message"], r.text
        long = {"examples": [{"text": "a" * 60, "text_pair": "b" * 41, "label": "x"},
                             {"text": "c", "text_pair": "d", "label": "y"}], "steps": 1}
        r = httpx.post(f"{url}/v1/tasks/p/train", json=long)
        assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large", r.text
        assert httpx.get(f"{url}/v1/jobs").json()["jobs"] == []  # nothing was queued
