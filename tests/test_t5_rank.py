"""T-Few rank classification on a tiny random T5: PEFT's own T5 (IA)3 model is the oracle of every
row's length-normalised choice scores, in a shuffled batch mixing tasks with different choices and
templates; an identity task equals Hugging Face's own T5."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

from switchboard.adapter_store.formats import peft as peft_format
from switchboard.adapter_store.upload import parse_upload
from switchboard.server.core.adapter import AdapterValidationError, TaskAdapter
from switchboard.server.core.backbone import default_model_path, wrap_model
from switchboard.server.core.engine import Engine
from switchboard.server.core.tuners.choices.config import choices_from_text
from switchboard.server.core.tuners.ia3.config import Ia3Weights
from tests.factories import TEXTS

TASKS = [  # (choices, template)
    (["positive", "negative"], "{text} Is this review positive or negative?"),
    (["yes", "no", "maybe so"], "Question: {text}"),
    (["a games package", "a library", "a server", "a tool"], None),
]


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=30522, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=3,
                      num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)


def _peft_t5(seed: int):  # noqa: ANN202
    from peft import IA3Config, TaskType, get_peft_model

    model = get_peft_model(tiny_t5(), IA3Config(task_type=TaskType.SEQ_2_SEQ_LM))  # PEFT's T5 targets k, v, wo
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=g))
    return model.eval()


def _templated_ids(tokenizer, text: str, template: str | None) -> list[int]:
    """The oracle's own (list-based) construction: prefix + text tokens + suffix + the closing token."""
    ids = tokenizer(text)["input_ids"]
    if not template:
        return ids
    before, after = template.split("{text}")
    side = [tokenizer(s, add_special_tokens=False)["input_ids"] if s.strip() else [] for s in (before, after)]
    return side[0] + ids[:-1] + side[1] + ids[-1:]


def _oracle_scores(model, tokenizer, text: str, choices: list[str], template: str | None) -> torch.Tensor:
    ids = torch.tensor([_templated_ids(tokenizer, text, template)])
    scores = []
    for choice in choices:
        labels = torch.tensor([tokenizer(choice)["input_ids"]])
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).logits
        scores.append(F.log_softmax(logits, -1).gather(-1, labels[..., None]).mean())
    return torch.stack(scores)


def test_peft_t5_ia3_rank_scores_in_a_shuffled_mixed_batch(tokenizer, tmp_path):
    backbone = wrap_model(copy.deepcopy(tiny_t5()), tokenizer, name="tiny-t5")
    assert backbone.spec.family == "t5" and {"cross_k_out", "dec_ffn_out_in"} <= set(backbone.spec.sites)
    engine = Engine(backbone, chunk_rows=4)
    models, slots = [], []
    for seed, (choices, template) in enumerate(TASKS, start=1):
        model = _peft_t5(seed)
        model.save_pretrained(tmp_path / f"t{seed}")
        files = {f: (tmp_path / f"t{seed}" / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
        with pytest.raises(AdapterValidationError, match="answer choices"):
            parse_upload(files, backbone.spec)  # a bare PEFT T5 adapter has no choices: refused, named
        import json

        from safetensors.torch import load
        adapter = peft_format.parse(json.loads(files["adapter_config.json"]), load(files["adapter_model.safetensors"]),
                                    backbone.spec, labels=choices)
        assert set(adapter.parts["ia3"].vectors) == {"k_out", "v_out", "ffn_out_in", "dec_k_out", "dec_v_out",
                                                      "cross_k_out", "cross_v_out", "dec_ffn_out_in"}
        adapter.parts["choices"] = choices_from_text(tokenizer, choices, template)
        slots.append(engine.load(adapter).slot)
        models.append(model)
    rows = [(i % 3, TEXTS[i]) for i in range(9)]
    order = torch.randperm(9, generator=torch.Generator().manual_seed(0)).tolist()
    rows = [rows[i] for i in order]
    enc = engine.tokenize([t for _, t in rows])
    scores = engine.forward(enc["input_ids"], enc["attention_mask"], torch.tensor([slots[a] for a, _ in rows]))
    assert scores.shape == (9, 4)
    for r, (a, text) in enumerate(rows):
        choices, template = TASKS[a]
        want = _oracle_scores(models[a], tokenizer, text, choices, template)
        assert (scores[r, : len(choices)] - want).abs().max().item() <= 1e-4, (r, a, scores[r], want)
        assert torch.isinf(scores[r, len(choices):]).all()


def test_identity_t5_task_equals_hugging_face(tokenizer):
    model = tiny_t5()
    backbone = wrap_model(copy.deepcopy(model), tokenizer, name="tiny-t5")
    engine = Engine(backbone)
    choices = ["red", "green colour"]
    adapter = TaskAdapter(labels=choices, parts={"ia3": Ia3Weights.identity(backbone.spec, ("k_out", "dec_k_out")),
                                                 "choices": choices_from_text(tokenizer, choices)})
    slot = engine.load(adapter).slot
    enc = engine.tokenize(TEXTS[:3])
    got = engine.forward(enc["input_ids"], enc["attention_mask"], torch.tensor([slot] * 3))
    for r in range(3):
        want = _oracle_scores(model, tokenizer, TEXTS[r], choices, None)
        assert (got[r, :2] - want).abs().max().item() <= 1e-4


def test_choices_are_refused_on_an_encoder(tokenizer):
    from tests.factories import random_adapter, tiny_backbone

    bert = tiny_backbone()
    adapter = random_adapter(bert.spec, seed=1).without("head")
    adapter.parts["choices"] = choices_from_text(tokenizer, ["a", "b"])
    adapter.labels = ["a", "b"]
    with pytest.raises(AdapterValidationError, match="encoder-decoder"):
        adapter.validate(bert.spec)


def test_head_tasks_ride_beside_choice_tasks_on_t5(tokenizer):
    """A T5 backbone also serves encoder-head tasks (and the built-in embeddings): one batch, each row as alone."""
    from tests.factories import random_adapter

    backbone = wrap_model(tiny_t5(), tokenizer, name="tiny-t5")
    engine = Engine(backbone, chunk_rows=0)
    head_task = engine.load(random_adapter(backbone.spec, seed=3, pooling="pair", num_labels=5,
                                           ia3_sites=("k_out", "dec_k_out"))).slot
    choices, template = TASKS[1]
    adapter = TaskAdapter(labels=choices, parts={"ia3": Ia3Weights.identity(backbone.spec, ("v_out",)),
                                                 "choices": choices_from_text(tokenizer, choices, template)})
    adapter.parts["ia3"].vectors["v_out"] *= 1.3
    choice_task = engine.load(adapter).slot
    slots = [head_task, choice_task, choice_task, head_task]
    inputs = [(TEXTS[0], TEXTS[5]), TEXTS[1], (TEXTS[2], TEXTS[6]), (TEXTS[3], TEXTS[7])]  # pair-pooled head rows
    enc = engine.tokenize(inputs)
    mixed = engine.forward(enc["input_ids"], enc["attention_mask"], torch.tensor(slots))
    for r, slot in enumerate(slots):
        alone_enc = engine.tokenize([inputs[r]])
        alone = engine.forward(alone_enc["input_ids"], alone_enc["attention_mask"], torch.tensor([slot]))[0]
        n = 5 if slot == head_task else 3
        assert (mixed[r, :n] - alone[:n]).abs().max().item() <= 1e-4
        assert torch.isinf(mixed[r, n:]).all()


@pytest.mark.parametrize("mutate, needle", [
    (lambda w: setattr(w, "token_ids", torch.zeros(65, 2)), "1..64 choices"),
    (lambda w: setattr(w, "token_ids", torch.zeros(2, 33)), "1..32 tokens"),
    (lambda w: w.token_ids.__setitem__((0, 0), 0.5), "token ids"),
    (lambda w: w.token_ids.__setitem__((0, 0), 1e9), "token ids"),
    (lambda w: w.token_ids.__setitem__((0, 0), -1.0), "-1 only after|at least one token"),
    (lambda w: w.prefix_ids.__setitem__(3, 7.0), "-1 only after"),
    (lambda w: setattr(w, "prefix_ids", torch.tensor(1.0)), r"prefix_ids must be \[64\]"),
])
def test_hostile_choices_are_refused_before_loading(tokenizer, mutate, needle):
    backbone = wrap_model(tiny_t5(), tokenizer, name="tiny-t5")
    weights = choices_from_text(tokenizer, ["yes", "no"], "Q: {text}")
    mutate(weights)
    adapter = TaskAdapter(labels=[f"l{i}" for i in range(weights.token_ids.shape[0])],
                          parts={"ia3": Ia3Weights.identity(backbone.spec, ("k_out",)), "choices": weights})
    with pytest.raises(AdapterValidationError, match=needle):
        Engine(backbone).load(adapter)


def test_decoder_passes_split_to_bound_the_logits_give_the_same_scores(tokenizer, tmp_path, monkeypatch):
    from switchboard.server.core.tuners.choices import layer

    monkeypatch.setattr(layer, "MAX_DECODER_TOKENS", 5)  # a pass of one or two pairs at a time
    monkeypatch.setattr(layer, "MAX_ENCODER_POSITIONS", 10)  # and by the encoder states each pair carries
    test_peft_t5_ia3_rank_scores_in_a_shuffled_mixed_batch(tokenizer, tmp_path)
