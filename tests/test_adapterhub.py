"""AdapterHub interop: fixtures generated once with `adapters` 1.3 in a separate venv
(tests/fixtures/adapterhub/generate.py) answer through our importer and engine with the library's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertModel

from switchboard.adapter_store.upload import parse_upload
from switchboard.server.core.adapter import AdapterValidationError
from switchboard.server.core.backbone import default_model_path, wrap_model
from switchboard.server.core.engine import Engine

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"
INDEX = json.loads((FIXTURES / "fixtures.json").read_text())["adapters"]


@pytest.fixture(scope="module")
def hub_backbone():
    model = BertModel.from_pretrained(FIXTURES / "backbone")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    return wrap_model(model, tokenizer, name="adapterhub-fixture")


def files_of(name: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (FIXTURES / name).iterdir()
            if p.suffix in (".json", ".safetensors") and p.name != "expected_logits.json"}


def test_every_fixture_answers_with_the_libraries_logits_in_one_mixed_batch(hub_backbone):
    engine = Engine(hub_backbone)
    inputs = json.loads((FIXTURES / "inputs.json").read_text())
    ids, mask = torch.tensor(inputs["input_ids"]), torch.tensor(inputs["attention_mask"])
    n = ids.shape[0]
    expected, slots = [], []
    for entry in INDEX:
        adapter = parse_upload(files_of(entry["dir"]), hub_backbone.spec)
        assert adapter.kind == entry["kind"] and adapter.num_labels == entry["num_labels"]
        slots.append(engine.load(adapter).slot)
        expected.append(torch.tensor(json.loads((FIXTURES / entry["dir"] / "expected_logits.json").read_text())))
    # every fixture alone, then all of them mixed in one batch (row i → fixture i % k)
    for slot, want in zip(slots, expected):
        got = engine.forward(ids, mask, torch.full((n,), slot))[:, : want.shape[1]]
        assert (got - want).abs().max().item() <= 1e-4
    k = len(slots)
    mixed = engine.forward(ids.repeat(k, 1), mask.repeat(k, 1), torch.tensor([slots[i // n] for i in range(k * n)]))
    for i in range(k * n):
        want = expected[i // n][i % n]
        assert (mixed[i, : want.shape[0]] - want).abs().max().item() <= 1e-4


def test_pickles_missing_heads_and_unsupported_options_are_refused(hub_backbone):
    files = files_of("houlsby")
    with pytest.raises(AdapterValidationError, match="switchboard convert"):
        parse_upload({**files, "pytorch_adapter.bin": b"\x80\x04."}, hub_backbone.spec)
    no_head = {k: v for k, v in files.items() if not k.startswith(("head_", "model_head"))}
    with pytest.raises(AdapterValidationError, match="head"):
        parse_upload(no_head, hub_backbone.spec)
    config = json.loads(files["adapter_config.json"])
    config["config"]["is_parallel"] = True
    with pytest.raises(AdapterValidationError, match="is_parallel"):
        parse_upload({**files, "adapter_config.json": json.dumps(config).encode()}, hub_backbone.spec)


def test_convert_turns_pickles_into_safetensors_on_the_client(hub_backbone, tmp_path):
    from safetensors.torch import load_file

    from switchboard.clients.cli import main

    src = tmp_path / "pickled"
    src.mkdir()
    for p in (FIXTURES / "ia3").iterdir():
        if p.suffix == ".json" and p.name != "expected_logits.json":
            (src / p.name).write_bytes(p.read_bytes())
    torch.save(load_file(FIXTURES / "ia3" / "adapter.safetensors"), src / "pytorch_adapter.bin")
    torch.save(load_file(FIXTURES / "ia3" / "model_head.safetensors"), src / "pytorch_model_head.bin")
    with pytest.raises(AdapterValidationError, match="switchboard convert"):
        parse_upload({p.name: p.read_bytes() for p in src.iterdir()}, hub_backbone.spec)
    assert main(["convert", str(src), "--out", str(tmp_path / "converted")]) == 0
    converted = {p.name: p.read_bytes() for p in (tmp_path / "converted").iterdir()}
    assert sorted(converted) == ["adapter.safetensors", "adapter_config.json", "head_config.json",
                                 "model_head.safetensors"]
    original = parse_upload(files_of("ia3"), hub_backbone.spec)
    assert parse_upload(converted, hub_backbone.spec).content_hash() == original.content_hash()
