"""Text pairs: tokenized as the backbone's pair encoding, mixed with single texts in one batch, equal to
PEFT's forward on Hugging Face's own pair encoding; `/v1/rerank` on a pair task."""

from __future__ import annotations

import copy

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from switchboard.adapter_store.upload import parse_upload
from switchboard.server.core.backbone import default_model_path, wrap_model
from switchboard.server.core.engine import Engine
from switchboard.server.core.tokenize import TextEncoder, segment_mask, tokenize
from tests.factories import TEXTS, TINY_CONFIG, peft_ia3, random_adapter
from tests.server_fixture import serving_in_thread, upload

QUERIES = ["command line parsing", "web server", "plot figures", "radio contest logging"]
MIXED = [(QUERIES[0], TEXTS[0]), TEXTS[1], (QUERIES[1], TEXTS[1]), (QUERIES[2], TEXTS[5] * 8), TEXTS[3],
         (QUERIES[3] * 20, TEXTS[3])]  # long second text, long first text: longest_first truncation


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)


def test_pair_encoding_equals_hugging_face(tokenizer):
    """ids and token types as the tokenizer's own pair call gives them, truncation longest_first."""
    encoder = TextEncoder(tokenizer, 32)
    ids, segments = encoder(MIXED)
    assert set(np.unique(segments).tolist()) == {0, 1, 2}
    assert ids.shape[1] == 32  # truncated
    for row, item in enumerate(MIXED):
        text, pair = (item, None) if isinstance(item, str) else item
        want = tokenizer(text, pair, truncation="longest_first", max_length=32)
        n = len(want["input_ids"])
        assert ids[row, :n].tolist() == want["input_ids"]
        assert segments[row, :n].tolist() == [m * (1 + t) for m, t in zip(want["attention_mask"],
                                                                           want["token_type_ids"], strict=True)]
        assert not segments[row, n:].any()
    # the one place the trainer tokenizes gives the same arrays
    ids2, segments2 = tokenize(tokenizer, MIXED, 32)
    assert (ids == ids2).all() and (segments == segments2).all()
    # a batch of single texts keeps the plain 0/1 mask
    assert set(np.unique(encoder(TEXTS[:3])[1]).tolist()) == {0, 1}


def _base() -> BertForSequenceClassification:
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(**TINY_CONFIG, num_labels=2)).eval()
    with torch.no_grad():  # token-type embeddings as large as the word embeddings: types must matter
        base.bert.embeddings.token_type_embeddings.weight.normal_(0, 1.0)
    return base


def _peft_pair_model(seed: int) -> torch.nn.Module:
    return peft_ia3(_base(), seed)


def test_mixed_pairs_and_texts_equal_peft_on_hugging_face_pairs(tokenizer, tmp_path):
    """Two PEFT (IA)3 pair classifiers; a shuffled batch mixing pairs and single texts, rows alternating
    between them; every row equals PEFT's forward on the tokenizer's own encoding of that input alone."""
    models = [_peft_pair_model(seed) for seed in (1, 2)]
    backbone = wrap_model(_base().bert, tokenizer, name="oracle", max_length=64)
    engine = Engine(backbone)
    slots = []
    for i, model in enumerate(models):
        out = tmp_path / f"a{i}"
        model.save_pretrained(out)
        files = {n: (out / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
        slots.append(engine.load(parse_upload(files, backbone.spec)).slot)
    ids, segments = TextEncoder(tokenizer, 64)(MIXED)
    order = torch.randperm(len(MIXED), generator=torch.Generator().manual_seed(3))
    rows = [MIXED[int(i)] for i in order]
    task_slots = torch.tensor([slots[r % 2] for r in range(len(rows))])
    ours = engine.forward(torch.from_numpy(ids)[order], torch.from_numpy(segments)[order], task_slots)
    flat = []
    for r, item in enumerate(rows):
        text, pair = (item, None) if isinstance(item, str) else item
        enc = tokenizer(text, pair, truncation="longest_first", max_length=64, return_tensors="pt")
        with torch.inference_mode():
            want = models[r % 2](**enc).logits[0]
            if pair is not None:
                flat.append(models[r % 2](input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0])
        assert (ours[r, :2] - want).abs().max().item() <= 1e-4, (r, ours[r], want)
    # not vacuous: without the token types a pair's logits differ
    pair_rows = [r for r, item in enumerate(rows) if not isinstance(item, str)]
    assert max((ours[r, :2] - f).abs().max().item() for r, f in zip(pair_rows, flat, strict=True)) > 1e-2


def test_segment_mask_drops_types_for_backbones_without_them(tokenizer):
    """A backbone with one token type (RoBERTa-like) ignores the second segment's type: no index error."""
    torch.manual_seed(0)
    from transformers import BertModel

    model = BertModel(BertConfig(**{**TINY_CONFIG, "type_vocab_size": 1}))
    engine = Engine(wrap_model(model, tokenizer, name="one-type", max_length=64))
    slot = engine.load(random_adapter(engine.spec, seed=1, num_labels=2)).slot
    ids, segments = TextEncoder(tokenizer, 64)(MIXED[:3])
    logits = engine.forward(torch.from_numpy(ids), torch.from_numpy(segments), torch.tensor([slot] * 3))
    mask = torch.from_numpy((segments > 0).astype(np.int64))
    assert torch.equal(logits, engine.forward(torch.from_numpy(ids), mask, torch.tensor([slot] * 3)))


def test_segment_mask_values():
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    types = np.array([[0, 0, 0, 0], [0, 0, 1, 1]])
    assert segment_mask(mask, types).tolist() == [[1, 1, 1, 0], [1, 1, 2, 2]]


# ----- over HTTP ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_server(tiny, tmp_path_factory):
    with serving_in_thread(tmp_path_factory.mktemp("pairs"), tiny, max_input_chars=1000) as (url, state):
        fp = tiny.spec.fingerprint
        assert upload(url, "relevance", random_adapter(tiny.spec, seed=5, num_labels=2), fp).status_code == 201
        assert upload(url, "score", random_adapter(tiny.spec, seed=6, num_labels=1), fp).status_code == 201
        assert upload(url, "three", random_adapter(tiny.spec, seed=7, num_labels=3), fp).status_code == 201
        yield url


def _classify(url: str, task: str, inputs, raw: bool = True) -> list:
    r = httpx.post(f"{url}/v1/classify", json={"task": task, "inputs": inputs, "raw_scores": raw}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_http_pairs_mix_with_texts_and_equal_each_sent_alone(pair_server):
    inputs = [list(x) if isinstance(x, tuple) else x for x in MIXED]
    together = _classify(pair_server, "relevance", inputs)
    for item, got in zip(inputs, together, strict=True):
        alone = _classify(pair_server, "relevance", [item])[0]
        assert {p["label"]: p["score"] for p in got} == pytest.approx({p["label"]: p["score"] for p in alone},
                                                                      abs=1e-4)
    # a pair is not its two texts joined: the pair encoding differs from one text
    joined = _classify(pair_server, "relevance", [f"{MIXED[0][0]} {MIXED[0][1]}"])[0]
    assert {p["label"]: p["score"] for p in joined} != pytest.approx({p["label"]: p["score"] for p in together[0]},
                                                                     abs=1e-4)


def test_rerank_sorts_documents_by_the_pair_tasks_relevance(pair_server):
    docs = TEXTS[:6]
    r = httpx.post(f"{pair_server}/v1/rerank", json={"task": "relevance", "query": QUERIES[0], "documents": docs,
                                                     "return_documents": True}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "relevance" and body["version"] == 1
    scores = [x["relevance_score"] for x in body["results"]]
    assert scores == sorted(scores, reverse=True) and sorted(x["index"] for x in body["results"]) == list(range(6))
    assert all(x["document"] == docs[x["index"]] for x in body["results"])
    # each score is the classify probability of the second label for the same pair
    probs = _classify(pair_server, "relevance", [[QUERIES[0], d] for d in docs], raw=False)
    labels = sorted({p["label"] for p in probs[0]})
    for x in body["results"]:
        second = {p["label"]: p["score"] for p in probs[x["index"]]}[labels[1]]
        assert x["relevance_score"] == pytest.approx(second, abs=1e-6)
    top = httpx.post(f"{pair_server}/v1/rerank", json={"task": "relevance", "query": QUERIES[0], "documents": docs,
                                                       "top_n": 2}, timeout=30).json()["results"]
    assert [x["index"] for x in top] == [x["index"] for x in body["results"][:2]] and "document" not in top[0]
    # a one-label task: the sigmoid of its logit; raw_scores: the logit itself
    raw = httpx.post(f"{pair_server}/v1/rerank", json={"task": "score", "query": "q", "documents": docs[:2],
                                                       "raw_scores": True}, timeout=30).json()["results"]
    logits = _classify(pair_server, "score", [["q", d] for d in docs[:2]])
    for x in raw:
        assert x["relevance_score"] == pytest.approx(logits[x["index"]][0]["score"], abs=1e-6)


@pytest.mark.parametrize(("path", "body", "status", "kind"), [
    ("/v1/rerank", {"task": "three", "query": "q", "documents": ["a"]}, 422, "not_a_rerank_task"),
    ("/v1/rerank", {"task": "nope", "query": "q", "documents": ["a"]}, 404, "task_not_found"),
    ("/v1/rerank", {"task": "relevance", "query": " ", "documents": ["a"]}, 422, "validation_error"),
    ("/v1/rerank", {"task": "relevance", "query": "q", "documents": []}, 422, "validation_error"),
    ("/v1/rerank", {"task": "relevance", "query": "q", "documents": ["a", ""]}, 422, "validation_error"),
    ("/v1/rerank", {"task": "relevance", "query": "q", "documents": ["a"], "top_n": 0}, 422, "validation_error"),
    ("/v1/rerank", {"task": "relevance", "query": "q", "documents": ["a"] * 65}, 413, "payload_too_large"),
    ("/v1/rerank", {"task": "relevance", "query": "q" * 500, "documents": ["d" * 501]}, 413, "payload_too_large"),
    ("/v1/classify", {"task": "relevance", "inputs": [["a", "b", "c"]]}, 422, "validation_error"),
    ("/v1/classify", {"task": "relevance", "inputs": [["a", " "]]}, 422, "validation_error"),
    ("/v1/classify", {"task": "relevance", "inputs": [["a"]]}, 422, "validation_error"),
    ("/v1/classify", {"task": "relevance", "inputs": [["a" * 500, "b" * 501]]}, 413, "payload_too_large"),
    ("/v1/embed", {"inputs": [["a", "b"]]}, 422, "validation_error"),
])
def test_pair_and_rerank_errors(pair_server, path, body, status, kind):
    r = httpx.post(f"{pair_server}{path}", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == kind


@pytest.mark.parametrize("hidden", [False, True])
def test_pair_pooling_equals_sbert_features_of_hugging_faces_forward(tokenizer, hidden):
    """A pair head's logits: each text of the pair mean-pooled apart from HF's own last hidden state of
    the pair encoding, L2-normalised, [u; v; |u − v|; u ∗ v] through the head; mixed with a mean-pooled
    task and single texts in one batch."""
    torch.manual_seed(0)
    from transformers import BertModel

    model = BertModel(BertConfig(**TINY_CONFIG)).eval()
    engine = Engine(wrap_model(copy.deepcopy(model), tokenizer, name="pairs", max_length=64))
    pair_task = random_adapter(engine.spec, seed=2, num_labels=2, pooling="pair", hidden=hidden)
    other = random_adapter(engine.spec, seed=3, num_labels=3, pooling="mean")
    slots = [engine.load(pair_task.without("ia3")).slot, engine.load(other).slot]
    ids, segments = TextEncoder(tokenizer, 64)(MIXED)
    task_slots = torch.tensor([slots[i % 2] for i in range(len(MIXED))])
    ours = engine.forward(torch.from_numpy(ids), torch.from_numpy(segments), task_slots)
    head = pair_task.head
    for row in range(0, len(MIXED), 2):
        item = MIXED[row]
        text, pair = (item, None) if isinstance(item, str) else item
        enc = tokenizer(text, pair, truncation="longest_first", max_length=64, return_tensors="pt")
        with torch.inference_mode():
            h = model(**enc).last_hidden_state[0]
        types, mask = enc["token_type_ids"][0], enc["attention_mask"][0].bool()
        u = torch.nn.functional.normalize(h[mask & (types == 0)].mean(0), dim=-1)
        v = (torch.nn.functional.normalize(h[mask & (types == 1)].mean(0), dim=-1) if pair is not None
             else torch.zeros_like(u))
        x = torch.cat([u, v, (u - v).abs(), u * v])
        if hidden:
            x = torch.tanh(head.hidden_w @ x + head.hidden_b)
        want = head.out_w @ x + head.out_b
        assert (ours[row, :2] - want).abs().max().item() <= 1e-4, (row, ours[row], want)


def test_a_task_that_cannot_rerank_is_refused_before_any_row_is_computed(pair_server):
    from tests.server_fixture import metric_samples

    ok = httpx.post(f"{pair_server}/v1/rerank", json={"task": "relevance", "query": "q", "documents": ["a"]})
    assert ok.status_code == 200
    before = metric_samples(pair_server)["switchboard_batches_total"]
    assert before > 0  # the counter the refusal must leave alone
    r = httpx.post(f"{pair_server}/v1/rerank", json={"task": "three", "query": "q", "documents": ["a"] * 64},
                   timeout=30)
    assert r.status_code == 422 and r.json()["error"]["type"] == "not_a_rerank_task"
    assert metric_samples(pair_server)["switchboard_batches_total"] == before
