"""The engine against oracles: each mixed-batch row vs the same row run alone; identity tasks vs the
bare backbone; the functional forward vs Hugging Face's own forward."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switchboard.server.core.adapter import AdapterValidationError
from switchboard.server.core.engine import CapacityError, Engine
from switchboard.server.core.tuners.head.layer import classify, pool
from switchboard.server.core.tuners.ia3.config import IA3_SITES, Ia3Weights, site_dim
from tests.factories import TEXTS, random_adapter, tiny_backbone

task_spec = st.fixed_dictionaries({
    "kind": st.sampled_from(["ia3", "houlsby", "mixed"]),
    "width": st.sampled_from([4, 8, 16]),
    "activation": st.sampled_from(["gelu", "gelu_tanh", "relu", "swish", "tanh"]),
    "num_labels": st.integers(1, 7),
    "pooling": st.sampled_from(["cls", "mean", "pooler"]),
    "hidden": st.booleans(),
    "layer_norm": st.booleans(),
    "ia3_sites": st.lists(st.sampled_from(list(IA3_SITES)), min_size=1, max_size=5, unique=True).map(tuple),
})


def run_alone(engine: Engine, slot: int, text: str) -> torch.Tensor:
    enc = engine.tokenize([text])
    return engine.forward(enc["input_ids"], enc["attention_mask"], torch.tensor([slot]))[0]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(task_spec, min_size=8, max_size=11), rows=st.integers(12, 24), seed=st.integers(0, 10_000),
       segment_max=st.sampled_from([0, 4, 64]), chunk_rows=st.sampled_from([0, 5, 8]))
def test_mixed_batch_rows_equal_rows_run_alone(tiny, specs, rows, seed, segment_max, chunk_rows):
    engine = Engine(tiny, segment_max_tasks=segment_max, chunk_rows=chunk_rows)
    slots = []
    for i, spec in enumerate(specs):
        adapter = random_adapter(tiny.spec, seed=seed + i, backbone_model=tiny.model, **spec)
        slots.append(engine.load(adapter))
    rng = random.Random(seed)
    # every task appears at least once, then random extra rows; shuffled
    assignment = list(range(len(slots))) + [rng.randrange(len(slots)) for _ in range(max(0, rows - len(slots)))]
    rng.shuffle(assignment)
    texts = [rng.choice(TEXTS) for _ in assignment]
    enc = engine.tokenize(texts)
    task_slots = torch.tensor([slots[a].slot for a in assignment])
    mixed = engine.forward(enc["input_ids"], enc["attention_mask"], task_slots)
    assert mixed.shape == (len(assignment), max(s.num_labels for s in slots))
    for row, (a, text) in enumerate(zip(assignment, texts)):
        c = slots[a].num_labels
        alone = run_alone(engine, slots[a].slot, text)
        assert torch.isinf(mixed[row, c:]).all()
        diff = (mixed[row, :c] - alone[:c]).abs().max().item()
        assert diff <= 1e-4, f"row {row} (task {a}, {specs[a]}) differs from the row run alone by {diff}"


def bare_logits_oracle(backbone, adapter, texts):
    """Hugging Face's own BertModel forward + the head computed by hand: independent of our encoder."""
    enc = backbone.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = backbone.model(**enc).last_hidden_state
        feats = pool(hidden, enc["attention_mask"], adapter.head.pooling, backbone.model.pooler)
        h = adapter.head
        return classify(feats, h.out_w.t()[None], h.out_b[None, None],
                        None if h.hidden_w is None else h.hidden_w.t()[None],
                        None if h.hidden_b is None else h.hidden_b[None, None])


@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_identity_tasks_give_the_bare_backbone(tiny, pooling):
    engine = Engine(tiny)
    texts = TEXTS[:6]
    head_only = random_adapter(tiny.spec, seed=1, kind="ia3", pooling=pooling, hidden=True)
    head_only = head_only.without("ia3")  # head on the bare backbone
    ones = random_adapter(tiny.spec, seed=1, kind="ia3", pooling=pooling, hidden=True)
    ones.parts["ia3"] = Ia3Weights({s: torch.ones(tiny.spec.num_layers, site_dim(s, tiny.spec)) for s in IA3_SITES})
    zero_up = random_adapter(tiny.spec, seed=1, kind="houlsby", pooling=pooling, hidden=True)
    zero_up.parts["houlsby"].up_w.zero_()
    zero_up.parts["houlsby"].up_b.zero_()
    zero_up.parts["head"] = ones.parts["head"] = head_only.head
    enc = engine.tokenize(texts)
    results = {}
    for name, adapter in {"head_only": head_only, "ones": ones, "zero_up": zero_up}.items():
        slot = engine.load(adapter).slot
        results[name] = engine.forward(enc["input_ids"], enc["attention_mask"], torch.full((len(texts),), slot))
    assert torch.equal(results["ones"], results["head_only"])
    assert torch.equal(results["zero_up"], results["head_only"])
    oracle = bare_logits_oracle(tiny, head_only, texts)
    torch.testing.assert_close(results["head_only"], oracle, atol=1e-5, rtol=0)


def test_bare_encoder_matches_hugging_face(tiny):
    engine = Engine(tiny)
    enc = engine.tokenize(TEXTS)
    ours = engine.bare_hidden(enc["input_ids"], enc["attention_mask"])
    with torch.inference_mode():
        ref = tiny.model(**enc).last_hidden_state
    mask = enc["attention_mask"].bool()
    assert (ours - ref)[mask].abs().max().item() <= 1e-5


def test_a_task_differs_from_the_bare_backbone(tiny):
    """Guards the oracle tests above: a real adapter must change the output."""
    engine = Engine(tiny)
    adapter = random_adapter(tiny.spec, seed=3, kind="mixed")
    bare = random_adapter(tiny.spec, seed=3, kind="mixed")
    bare = bare.without("ia3", "houlsby")
    enc = engine.tokenize(TEXTS[:4])
    a = engine.forward(enc["input_ids"], enc["attention_mask"], torch.full((4,), engine.load(adapter).slot))
    b = engine.forward(enc["input_ids"], enc["attention_mask"], torch.full((4,), engine.load(bare).slot))
    assert (a - b).abs().max().item() > 1e-2


def test_unload_frees_slots_and_bytes_and_reuses_them(tiny):
    engine = Engine(tiny, initial_slots=2)
    adapters = [random_adapter(tiny.spec, seed=i, kind="mixed", width=8) for i in range(10)]
    resident = [engine.load(a) for a in adapters]  # grows past the initial capacity
    expected = sum(a.nbytes for a in adapters)
    assert engine.resident_bytes == expected  # exactly the tasks' own parameter bytes
    enc = engine.tokenize(TEXTS[:10])
    before = engine.forward(enc["input_ids"], enc["attention_mask"], torch.tensor([r.slot for r in resident]))
    allocated = engine.allocated_bytes
    for r in resident[:5]:
        engine.unload(r.slot)
    assert engine.resident_bytes == sum(a.nbytes for a in adapters[5:])
    again = [engine.load(a) for a in adapters[:5]]
    assert engine.allocated_bytes == allocated  # freed slots were reused, nothing new allocated
    after = engine.forward(enc["input_ids"], enc["attention_mask"], torch.tensor([r.slot for r in again + resident[5:]]))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    with pytest.raises(KeyError):
        engine.forward(enc["input_ids"][:1], enc["attention_mask"][:1], torch.tensor([resident[0].slot + 1000]))


def test_byte_budget_is_enforced(tiny):
    adapter = random_adapter(tiny.spec, seed=0, kind="houlsby", width=16)
    engine = Engine(tiny, max_adapter_bytes=adapter.nbytes * 2)
    engine.load(adapter)
    engine.load(adapter)
    with pytest.raises(CapacityError):
        engine.load(adapter)


@pytest.mark.parametrize("mutate, message", [
    (lambda a: setattr(a.head, "out_w", a.head.out_w[:, :5]), "shape"),
    (lambda a: a.parts["ia3"].vectors["k_out"].__setitem__((0, 0), float("nan")), "NaN"),
    (lambda a: setattr(a, "labels", a.labels[:-1]), "label"),
    (lambda a: setattr(a.parts["houlsby"], "activation", "softplus"), "activation"),
])
def test_invalid_adapters_are_refused_and_change_nothing(tiny, mutate, message):
    engine = Engine(tiny)
    adapter = random_adapter(tiny.spec, seed=0, kind="mixed")
    mutate(adapter)
    with pytest.raises(AdapterValidationError, match=message):
        engine.load(adapter)
    assert engine.resident_tasks == 0 and engine.resident_bytes == 0


@pytest.mark.parametrize("precision,bound", [("bf16", 0.25), ("bf16-full", 0.5), ("int8", 1.0)])
def test_reduced_precisions_are_close_to_fp32(precision, bound):
    """Every kind (LayerNorm, hidden heads, the pooler included) runs in every precision."""
    fp32 = Engine(tiny_backbone(seed=5))
    low = Engine(tiny_backbone(seed=5), precision=precision)
    specs = [dict(kind="ia3"), dict(kind="houlsby"), dict(kind="mixed", layer_norm=True, hidden=True),
             dict(kind="ia3", pooling="pooler"), dict(kind="houlsby", pooling="mean")]
    adapters = [random_adapter(fp32.spec, seed=i, backbone_model=fp32.model, **kw) for i, kw in enumerate(specs)]
    slots32 = torch.tensor([fp32.load(a).slot for a in adapters])
    slots_low = torch.tensor([low.load(a).slot for a in adapters])
    enc = fp32.tokenize(TEXTS[: len(adapters)])
    a = fp32.forward(enc["input_ids"], enc["attention_mask"], slots32)
    b = low.forward(enc["input_ids"], enc["attention_mask"], slots_low)
    assert a.dtype == b.dtype == torch.float32
    finite = torch.isfinite(a)
    assert torch.equal(finite, torch.isfinite(b))
    # tiny random models amplify rounding; agreement on real MiniLM is measured by bench/precision.py
    assert (a[finite] - b[finite]).abs().max().item() < bound
