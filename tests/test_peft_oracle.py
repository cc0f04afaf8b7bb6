"""PEFT as the oracle: an (IA)3 adapter saved by `peft` answers with PEFT's own logits through our engine."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from switchboard.adapter_store.formats import peft as peft_format
from switchboard.adapter_store.upload import parse_upload
from switchboard.server.core.backbone import default_model_path, wrap_model
from switchboard.server.core.engine import Engine
from tests.factories import TEXTS, TINY_CONFIG, peft_ia3


def _check_against_peft(base_factory, tokenizer, tmp_path, seeds=(1, 2, 3), atol=1e-4, **config_kwargs):
    """Load several PEFT adapters, serve them mixed in one batch, compare each row with PEFT."""
    backbone_src = base_factory()
    backbone = wrap_model(copy.deepcopy(backbone_src.bert), tokenizer, name="oracle")
    engine = Engine(backbone)
    expected, slots = [], []
    enc = tokenizer(TEXTS[:6], padding=True, return_tensors="pt")
    for seed in seeds:
        model = peft_ia3(base_factory(), seed, **config_kwargs)
        out = tmp_path / f"adapter{seed}"
        model.save_pretrained(out)
        # the files exactly as PEFT saved them, through the server's upload parser
        files = {name: (out / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
        assert json.loads(files["adapter_config.json"])["peft_type"] == "IA3"
        adapter = parse_upload(files, backbone.spec)
        assert adapter.kind == "ia3" and adapter.head.pooling == "pooler"
        slots.append(engine.load(adapter).slot)
        with torch.inference_mode():
            expected.append(model(**enc).logits)
    # row i uses adapter i % n: a shuffled mixed batch
    n = len(seeds)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    ids, mask = enc["input_ids"][order], enc["attention_mask"][order]
    task_slots = torch.tensor([slots[int(i) % n] for i in range(6)])
    ours = engine.forward(ids, mask, task_slots)
    for row in range(6):
        want = expected[row % n][order[row]]
        got = ours[row, : want.shape[0]]
        assert (got - want).abs().max().item() <= atol, (row, got, want)
    # and the adapters really differ from each other (the comparison is not vacuous)
    assert (expected[0] - expected[1]).abs().max().item() > 1e-2


def test_peft_ia3_defaults_on_tiny_bert(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)

    def factory():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(**TINY_CONFIG, num_labels=4)).eval()

    _check_against_peft(factory, tokenizer, tmp_path)


def test_peft_ia3_all_sites_including_intermediate(tmp_path):
    """target intermediate.dense too (output scaling, AdapterHub's placement) and a regex ff rule."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)

    def factory():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(**TINY_CONFIG, num_labels=3)).eval()

    _check_against_peft(factory, tokenizer, tmp_path,
                        target_modules=["key", "value", "intermediate.dense", "output.dense"],
                        feedforward_modules=["output.dense"])


def test_peft_ia3_on_real_minilm(tmp_path):
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def factory():
        torch.manual_seed(0)
        return BertForSequenceClassification.from_pretrained(path, num_labels=5, local_files_only=True).eval()

    _check_against_peft(factory, tokenizer, tmp_path, seeds=(1, 2))


def test_non_ia3_peft_adapters_are_refused(tiny):
    with pytest.raises(ValueError, match="IA3"):
        peft_format.parse({"peft_type": "LORA"}, {}, tiny.spec)
