"""Every backbone family against its oracles (docs/backbones.md): PEFT's own logits for PEFT (IA)3
adapters with each family's classification head, Hugging Face's own forward for identity tasks, and
every row of a shuffled mixed batch equal to the row run alone. Tiny random models built from configs."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, GPT2Config, GPT2Model

from switchboard.adapter_store.upload import parse_upload
from switchboard.server.core.backbone import UnsupportedBackboneError, default_model_path, wrap_model
from switchboard.server.core.engine import Engine
from switchboard.server.core.forward import BatchParams, encode
from switchboard.server.core.tuners.ia3.config import Ia3Weights
from switchboard.server.core.tuners.ia3.kind import Ia3Kind
from tests.factories import TEXTS, family_backbone, family_classifier, family_configs, random_adapter

FAMILIES = list(family_configs())

# PEFT's default target modules where it has them (deberta-v2, qwen2, qwen3, llama); the analogous
# modules where it has none; and the head modules each family's classifier saves.
PEFT_SETTINGS: dict[str, dict] = {
    "distilbert": dict(target_modules=["k_lin", "v_lin", "lin2"], feedforward_modules=["lin2"],
                       modules_to_save=["pre_classifier", "classifier"]),
    "mpnet": dict(target_modules=["k", "v", "output.dense"], feedforward_modules=["output.dense"],
                  modules_to_save=["classifier"]),
    "deberta-v3": dict(modules_to_save=["pooler", "classifier"]),
    "modernbert": dict(target_modules=["Wqkv", "mlp.Wo"], feedforward_modules=["mlp.Wo"],
                       modules_to_save=["head", "classifier"]),
    "qwen2": dict(modules_to_save=["score"]),
    "qwen3": dict(modules_to_save=["score"]),
    "llama": dict(modules_to_save=["score"]),
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)


def _peft_model(name: str, seed: int):  # noqa: ANN202
    from peft import IA3Config, TaskType, get_peft_model

    model = get_peft_model(family_classifier(name, num_labels=3), IA3Config(task_type=TaskType.SEQ_CLS,
                                                                             **PEFT_SETTINGS[name]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "ia3_l" in pname:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=g))
            elif param.requires_grad:  # the saved head modules
                param.copy_(0.5 * torch.randn(param.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_peft_ia3_adapters_give_peft_logits_in_a_mixed_batch(name, tokenizer, tmp_path):
    backbone = wrap_model(copy.deepcopy(family_classifier(name).base_model), tokenizer, name=name)
    engine = Engine(backbone)
    enc = tokenizer(TEXTS[:6], padding=True, return_tensors="pt")
    expected, slots = [], []
    for seed in (1, 2, 3):
        model = _peft_model(name, seed)
        out = tmp_path / f"adapter{seed}"
        model.save_pretrained(out)
        files = {f: (out / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
        assert json.loads(files["adapter_config.json"])["peft_type"] == "IA3"
        adapter = parse_upload(files, backbone.spec)
        slots.append(engine.load(adapter).slot)
        with torch.inference_mode():
            expected.append(model(**enc).logits)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    ours = engine.forward(enc["input_ids"][order], enc["attention_mask"][order],
                          torch.tensor([slots[i % 3] for i in range(6)]))
    for row in range(6):
        want = expected[row % 3][order[row]]
        assert (ours[row, :3] - want).abs().max().item() <= 1e-4, (name, row, ours[row], want)
    assert (expected[0] - expected[1]).abs().max().item() > 1e-2  # the adapters really differ


@pytest.mark.parametrize("name", FAMILIES)
def test_identity_tasks_equal_hugging_face_forward(name, tokenizer):
    backbone = family_backbone(name)
    spec, model = backbone.spec, backbone.model
    enc = tokenizer(TEXTS[:5], padding=True, return_tensors="pt")
    sites = tuple(s for s in spec.sites if not s.endswith("_norm"))
    params = BatchParams({"ia3": Ia3Kind().single_task(Ia3Weights.identity(spec, sites))})
    with torch.inference_mode():
        want = model(**enc).last_hidden_state
        got = encode(model, enc["input_ids"], enc["attention_mask"], params)
        bare = Engine(backbone).bare_hidden(enc["input_ids"], enc["attention_mask"])
    real = enc["attention_mask"].bool()
    assert (got - want)[real].abs().max().item() <= 1e-5
    assert (bare - want)[real].abs().max().item() <= 1e-5
    # and a non-identity vector does change the forward (the hooks are live)
    vectors = Ia3Weights.identity(spec, ("v_out",))
    vectors.vectors["v_out"] *= 1.5
    with torch.inference_mode():
        moved = encode(model, enc["input_ids"], enc["attention_mask"],
                       BatchParams({"ia3": Ia3Kind().single_task(vectors)}))
    assert (moved - want)[real].abs().max().item() > 1e-3


def _task_specs(spec) -> st.SearchStrategy:  # noqa: ANN001
    vector_sites = [s for s in spec.sites if not s.endswith("_norm")]
    norms = {"attn_norm", "ffn_norm"} <= set(spec.sites)
    poolings = ["cls", "mean", "pair"] + (["last"] if spec.family == "decoder" else [])
    return st.fixed_dictionaries({
        "kind": st.sampled_from(["ia3", "houlsby", "mixed"]),
        "width": st.sampled_from([4, 8]),
        "activation": st.sampled_from(["gelu", "relu", "tanh"]),
        "num_labels": st.integers(1, 5),
        "pooling": st.sampled_from(poolings),
        "hidden": st.booleans(),
        "layer_norm": st.booleans() if norms else st.just(False),
        "ia3_sites": st.lists(st.sampled_from(vector_sites), min_size=1, max_size=4, unique=True).map(tuple),
    })


@pytest.mark.parametrize("name", FAMILIES)
def test_mixed_batch_rows_equal_rows_run_alone(name):
    backbone = family_backbone(name)

    @settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(specs=st.lists(_task_specs(backbone.spec), min_size=3, max_size=5), seed=st.integers(0, 10_000),
           chunk_rows=st.sampled_from([0, 4]))
    def check(specs, seed, chunk_rows):  # noqa: ANN001
        engine = Engine(backbone, chunk_rows=chunk_rows)
        slots = [engine.load(random_adapter(backbone.spec, seed=seed + i, backbone_model=backbone.model, **s))
                 for i, s in enumerate(specs)]
        rng = random.Random(seed)
        assignment = list(range(len(slots))) + [rng.randrange(len(slots)) for _ in range(4)]
        rng.shuffle(assignment)
        texts = [rng.choice(TEXTS) if rng.random() < 0.7 else (rng.choice(TEXTS), rng.choice(TEXTS))
                 for _ in assignment]
        enc = engine.tokenize(texts)
        mixed = engine.forward(enc["input_ids"], enc["attention_mask"], torch.tensor([slots[a].slot for a in assignment]))
        for row, (a, text) in enumerate(zip(assignment, texts)):
            alone_enc = engine.tokenize([text])
            alone = engine.forward(alone_enc["input_ids"], alone_enc["attention_mask"], torch.tensor([slots[a].slot]))[0]
            c = slots[a].num_labels
            diff = (mixed[row, :c] - alone[:c]).abs().max().item()
            assert diff <= 1e-4, f"{name} row {row} (task {a}, {specs[a]}) differs from the row alone by {diff}; all: {specs} {assignment} {texts}"

    check()


def test_unknown_architectures_are_refused_naming_the_supported_ones(tokenizer):
    model = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=30522))
    with pytest.raises(UnsupportedBackboneError, match="'gpt2'.*distilbert.*mpnet.*deberta-v2.*modernbert.*qwen3"):
        wrap_model(model, tokenizer, name="gpt2")


def test_pre_norm_families_refuse_a_layer_norm_part():
    backbone = family_backbone("qwen3")
    bert_like = family_backbone("distilbert")
    adapter = random_adapter(bert_like.spec, seed=1, layer_norm=True, backbone_model=bert_like.model)
    adapter.parts["ia3"] = Ia3Weights.identity(backbone.spec, ("k_out",))
    with pytest.raises(Exception, match="pre-norm"):
        adapter.validate(backbone.spec)


def test_deberta_position_bias_per_task_fallback_gives_peft_logits_too(tokenizer, tmp_path, monkeypatch):
    """A kind at q_out/k_out that is not a pure scale takes the per-task loop: same logits as the scale path."""
    from switchboard.server.core.tuners.ia3.layer import Ia3Params

    monkeypatch.setattr(Ia3Params, "scale", lambda self, site, layer: NotImplemented)
    test_peft_ia3_adapters_give_peft_logits_in_a_mixed_batch("deberta-v3", tokenizer, tmp_path)


@pytest.mark.parametrize("value", ["nan", "1.0", "-1e-5", "x"])
def test_a_broken_head_norm_eps_in_a_file_is_refused(value):
    from switchboard.server.core.adapter import AdapterValidationError
    from switchboard.server.core.tuners.head.kind import HeadKind

    tensors = {"out_w": torch.zeros(2, 8), "out_b": torch.zeros(2), "hidden_w": torch.zeros(8, 8),
               "hidden_b": torch.zeros(8), "norm_w": torch.ones(8), "norm_b": torch.zeros(8)}
    with pytest.raises(AdapterValidationError, match="head_norm_eps"):
        HeadKind().from_tensors(tensors, {"head_norm_eps": value})


def test_hooked_families_run_bf16_full_with_every_kind():
    """bf16-full: the residual stream is bf16, the LayerNorm and head pools float32 — every site casts back."""
    backbone = family_backbone("distilbert")
    fp32, bf16 = Engine(backbone), Engine(family_backbone("distilbert"), precision="bf16-full")
    adapter = random_adapter(backbone.spec, seed=4, kind="mixed", layer_norm=True, backbone_model=backbone.model)
    enc = fp32.tokenize(TEXTS[:4])
    want = fp32.forward(enc["input_ids"], enc["attention_mask"], torch.tensor([fp32.load(adapter).slot] * 4))
    got = bf16.forward(enc["input_ids"], enc["attention_mask"], torch.tensor([bf16.load(adapter).slot] * 4))
    assert (got - want).abs().max().item() < 0.1 * want.abs().max().item() + 0.05


def test_the_few_shot_recipe_keeps_to_the_sites_a_family_has():
    from switchboard.server.core.tuners.ia3.kind import Ia3Kind
    from switchboard.server.runtime.training.trainer import TrainConfig, resolve_recipe

    spec = family_backbone("qwen3").spec
    small = [(f"text {i}", "ab"[i % 2]) for i in range(8)]
    cfg, recipe = resolve_recipe(TrainConfig(kind="ia3"), small, spec.family, spec.sites)
    assert recipe == "few-shot" and set(cfg.ia3_sites) == {"k_out", "v_out", "attn_out_in", "ffn_out_in"}
    with pytest.raises(ValueError, match="ffn_int_out.*do not exist on this decoder backbone"):
        Ia3Kind().new(spec, None, torch.Generator(), {"ia3_sites": ("ffn_int_out",)})
