"""T-Few training on a tiny random T5: the loss against a per-example loop written from the paper, and a
trained task that learns its (learnable) training set and is served exactly as it was trained."""

from __future__ import annotations

import math

import torch
from transformers import AutoTokenizer

from switchboard.server.core.backbone import default_model_path, wrap_model
from switchboard.server.core.engine import Engine
from switchboard.server.runtime.training.tfew import tfew_loss
from switchboard.server.runtime.training.trainer import TrainConfig, logits_of, train
from tests.test_t5_rank import tiny_t5


def _loop_loss(log_probs, lengths, y) -> float:  # noqa: ANN001
    """L_LM + L_UL + L_LN, one example and one token at a time."""
    lm_sum = lm_n = ul_sum = ul_n = ln = 0.0
    for b in range(len(y)):
        scores = []
        for c in range(len(lengths[b])):
            tokens = [float(log_probs[b, c, t]) for t in range(lengths[b][c])]
            scores.append(sum(tokens) / len(tokens))
            if c == y[b]:
                lm_sum -= sum(tokens)
                lm_n += len(tokens)
            else:
                ul_sum -= sum(math.log(1 - math.exp(t)) for t in tokens)
                ul_n += len(tokens)
        ln -= scores[y[b]] - math.log(sum(math.exp(s) for s in scores))
    return lm_sum / lm_n + ul_sum / ul_n + ln / len(y)


def test_tfew_loss_matches_the_paper_term_by_term():
    g = torch.Generator().manual_seed(0)
    lengths = [[2, 3, 1], [1, 1, 3]]
    log_probs = -torch.rand(2, 3, 3, generator=g) * 3 - 0.01
    valid = torch.tensor([[[t < n for t in range(3)] for n in row] for row in lengths])
    y = torch.tensor([1, 2])
    assert abs(tfew_loss(log_probs, valid, y).item() - _loop_loss(log_probs, lengths, y.tolist())) < 1e-5


def test_tfew_training_learns_and_is_served_as_trained():
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    backbone = wrap_model(tiny_t5(), tokenizer, name="tiny-t5")
    examples = [(f"the {w} ran quickly", "yes") for w in ("dog", "cat", "horse", "fox")] + \
               [(f"a {w} sat still", "no") for w in ("dog", "cat", "horse", "fox")]
    cfg = TrainConfig(kind="ia3", steps=60, lr=3e-2, choices=("yes", "no"), template="{text} Did it move?",
                      calibrate=False)
    adapter, report = train(backbone, examples, cfg, eval_examples=examples, progress=False)
    assert report["recipe"] == "t-few" and report["config"]["batch_size"] == 8
    assert set(adapter.parts) == {"ia3", "choices"} and adapter.labels == ["yes", "no"]
    assert report["history"]["loss"][-1] < report["history"]["loss"][0] * 0.5
    assert report["accuracy"] == 1.0
    texts = [t for t, _ in examples]
    engine = Engine(backbone)
    slot = engine.load(adapter).slot
    enc = engine.tokenize(texts)
    served = engine.forward(enc["input_ids"], enc["attention_mask"], torch.tensor([slot] * len(texts)))
    assert (served - logits_of(backbone, adapter, texts)).abs().max().item() <= 1e-4
