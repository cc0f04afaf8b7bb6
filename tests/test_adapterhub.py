"""AdapterHub interop: fixtures generated once with `adapters` 1.3 in a separate venv
(tests/fixtures/adapterhub/generate.py, generate_families.py) answer through our importer and engine with
the library's logits: BERT, and the other families the library supports (DistilBERT, DeBERTa-v2,
Llama, Qwen2, Qwen3); ModernBERT's uploads are refused (see adapter_store/formats/adapterhub.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertModel

from switchboard.adapter_store.upload import parse_upload
from switchboard.server.core.adapter import AdapterValidationError
from switchboard.server.core.backbone import default_model_path, wrap_model
from switchboard.server.core.engine import Engine
from switchboard.server.core.families import family_for

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"
INDEX = json.loads((FIXTURES / "fixtures.json").read_text())["adapters"]
FAMILY_FIXTURES = FIXTURES / "families"
FAMILY_INDEX = json.loads((FAMILY_FIXTURES / "fixtures.json").read_text())["families"]
SERVED_FAMILIES = [f for f, entry in FAMILY_INDEX.items() if all(a["served"] for a in entry["adapters"])]


@pytest.fixture(scope="module")
def hub_backbone():
    model = BertModel.from_pretrained(FIXTURES / "backbone")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    return wrap_model(model, tokenizer, name="adapterhub-fixture")


def files_of(name: str, root: Path = FIXTURES) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / name).iterdir()
            if p.suffix in (".json", ".safetensors") and not p.name.startswith("expected_logits")}


def expected_of(path: Path) -> torch.Tensor:
    return torch.tensor(json.loads((path / "expected_logits.json").read_text()))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)


def family_backbone(name: str, tokenizer):  # noqa: ANN201
    """The committed tiny backbone of a family fixture, loaded with transformers and wrapped as served."""
    family = family_for(FAMILY_INDEX[name]["model_type"])
    assert family is not None and family.name == FAMILY_INDEX[name]["family"]
    model = AutoModel.from_pretrained(FAMILY_FIXTURES / name / "backbone", attn_implementation=family.attention)
    return wrap_model(model.eval(), tokenizer, name=f"adapterhub-{name}")


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


@pytest.mark.parametrize("name", SERVED_FAMILIES)
def test_family_fixtures_answer_with_the_libraries_logits_in_a_shuffled_mixed_batch(name, tokenizer):
    backbone = family_backbone(name, tokenizer)
    assert backbone.spec.family == FAMILY_INDEX[name]["family"]
    engine = Engine(backbone)
    inputs = json.loads((FIXTURES / "inputs.json").read_text())
    ids, mask = torch.tensor(inputs["input_ids"]), torch.tensor(inputs["attention_mask"])
    n = ids.shape[0]
    expected, slots = [], []
    for entry in FAMILY_INDEX[name]["adapters"]:
        adapter = parse_upload(files_of(entry["dir"], FAMILY_FIXTURES / name), backbone.spec)
        assert adapter.kind == entry["kind"] and adapter.num_labels == entry["num_labels"]
        assert adapter.metadata["source_format"] == "adapterhub"
        slots.append(engine.load(adapter).slot)
        expected.append(expected_of(FAMILY_FIXTURES / name / entry["dir"]))
    for slot, want in zip(slots, expected):
        got = engine.forward(ids, mask, torch.full((n,), slot))[:, : want.shape[1]]
        assert (got - want).abs().max().item() <= 1e-4
    # every (fixture, input) pair once, rows shuffled: padding, pooling and per-row tasks all mixed
    k = len(slots)
    order = torch.randperm(k * n, generator=torch.Generator().manual_seed(0))
    task, row = order // n, order % n
    mixed = engine.forward(ids[row], mask[row], torch.tensor([slots[t] for t in task.tolist()]))
    for i, (t, r) in enumerate(zip(task.tolist(), row.tolist())):
        want = expected[t][r]
        assert (mixed[i, : want.shape[0]] - want).abs().max().item() <= 1e-4


def test_every_committed_family_fixture_is_served_or_refused_as_indexed():
    assert set(SERVED_FAMILIES) == {"bert", "distilbert", "deberta-v2", "llama", "qwen2", "qwen3"}
    assert [f for f in FAMILY_INDEX if f not in SERVED_FAMILIES] == ["modernbert"]
    kinds = {f: {a["kind"] for a in e["adapters"]} for f, e in FAMILY_INDEX.items() if f != "bert"}
    assert all(k == {"houlsby", "ia3"} for k in kinds.values())  # BERT's flexible-head fixtures are ../
    heads = {a["head"] for e in FAMILY_INDEX.values() for a in e["adapters"]}
    assert heads == {"flex", "static", "plugin"}


def test_modernbert_mpnet_and_t5_uploads_are_refused_naming_why(tokenizer):
    backbone = family_backbone("modernbert", tokenizer)
    for entry in FAMILY_INDEX["modernbert"]["adapters"]:
        # the library's own logits move with the random Wqkv bias it adds (recorded by generate_families.py)
        assert entry["stray_bias_logit_delta"] > 0.05 and entry["library_reload_logit_delta"] > 0.05
        with pytest.raises(AdapterValidationError, match="modernbert family: .*Wqkv .*random bias"):
            parse_upload(files_of(entry["dir"], FAMILY_FIXTURES / "modernbert"), backbone.spec)
    for family, why in (("mpnet", "no MPNet support"), ("t5", "answer choices")):
        spec = dataclasses.replace(backbone.spec, family=family)
        with pytest.raises(AdapterValidationError, match=why):
            parse_upload(files_of("ia3"), spec)  # refused before its tensors are read


def test_family_uploads_with_foreign_modules_or_heads_are_refused(tokenizer):
    from safetensors.torch import load, save

    llama = family_backbone("llama", tokenizer)
    root = FAMILY_FIXTURES / "llama"
    # another family's adapter: its module names are not this family's
    with pytest.raises(AdapterValidationError, match="unexpected tensor distilbert.transformer.layer"):
        parse_upload(files_of("ia3", FAMILY_FIXTURES / "distilbert"), llama.spec)
    with pytest.raises(AdapterValidationError, match="unexpected tensor distilbert.transformer.layer.*_adapters"):
        parse_upload(files_of("houlsby", FAMILY_FIXTURES / "distilbert"), llama.spec)
    # IA3 on a module that is no site of the family (gate_proj feeds the activation)
    files = files_of("ia3", root)
    tensors = load(files["adapter.safetensors"])
    renamed = {k.replace("mlp.down_proj", "mlp.gate_proj"): v for k, v in tensors.items()}
    with pytest.raises(AdapterValidationError, match="IA3 on mlp.gate_proj is not a site .* decoder family"):
        parse_upload({**files, "adapter.safetensors": save(renamed)}, llama.spec)
    # a static (transformers model) head: only a sequence classifier's, with its own tensor names
    qwen = family_backbone("qwen2", tokenizer)
    files = files_of("ia3", FAMILY_FIXTURES / "qwen2")
    head_config = json.loads(files["head_config.json"])
    assert head_config["config"] is None and head_config["model_class"] == "Qwen2ForSequenceClassification"
    qa = {**head_config, "model_class": "Qwen2ForQuestionAnswering"}
    with pytest.raises(AdapterValidationError, match="Qwen2ForQuestionAnswering"):
        parse_upload({**files, "head_config.json": json.dumps(qa).encode()}, qwen.spec)
    wrong = {**head_config, "num_labels": 5}
    with pytest.raises(AdapterValidationError, match="num_labels=5"):
        parse_upload({**files, "head_config.json": json.dumps(wrong).encode()}, qwen.spec)
    head = load(files["model_head.safetensors"])
    extra = save({**head, "classifier.weight": head["score.weight"].clone()})
    with pytest.raises(AdapterValidationError, match="Qwen2ForSequenceClassification"):
        parse_upload({**files, "model_head.safetensors": extra}, qwen.spec)
