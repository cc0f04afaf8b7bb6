"""Few-shot trainer options (issue 22) on a tiny model: label smoothing, (IA)3 sites, the contrastive
warm-up of the adapter (SetFit's first phase) and a fixed schedule of 0 joint steps."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from switchboard.server.core.tuners.ia3.config import IA3_SITES, PAPER_SITES
from switchboard.server.runtime.training.trainer import (
    TrainConfig,
    contrastive_pairs,
    logits_of,
    single_task_params,
    train,
)
from tests.factories import tiny_backbone
from tests.test_train import WORDS, synthetic


def test_contrastive_pairs_are_half_same_label_half_different_and_say_which():
    examples = synthetic(5, seed=0)
    pairs = contrastive_pairs(examples, 40, random.Random(0))
    assert len(pairs) == 40 and sum(t for _, _, t in pairs) == 20
    for a, b, target in pairs:
        assert a != b and (examples[a][1] == examples[b][1]) == (target == 1.0)


def test_label_smoothing_is_applied_to_the_training_loss():
    backbone = tiny_backbone(seed=3)
    examples = synthetic(4, seed=1)
    losses = {}
    for smoothing in (0.0, 0.3):
        cfg = TrainConfig(kind="ia3", steps=1, batch_size=len(examples), max_length=32, label_smoothing=smoothing,
                          head_init="random", group_by_length=False, calibrate=False)
        _, report = train(backbone, examples, cfg, examples, progress=False)
        losses[smoothing] = report["history"]["loss"][0]
    # same weights before the one step, so the step-1 losses differ only by the smoothing
    adapter, _ = train(backbone, examples, TrainConfig(kind="ia3", steps=0, max_length=32, head_init="random",
                                                       calibrate=False), examples, progress=False)
    logits = logits_of(backbone, adapter, [t for t, _ in examples], 32)
    y = torch.tensor([sorted(WORDS).index(label) for _, label in examples])
    assert abs(losses[0.0] - F.cross_entropy(logits, y).item()) < 1e-4
    assert abs(losses[0.3] - F.cross_entropy(logits, y, label_smoothing=0.3).item()) < 1e-4


def test_ia3_sites_are_the_papers_by_default_and_all_five_on_request():
    backbone = tiny_backbone(seed=3)
    examples = synthetic(3, seed=1)
    for sites, expected in ((None, set(PAPER_SITES)), (tuple(IA3_SITES), set(IA3_SITES))):
        cfg = TrainConfig(kind="ia3", steps=2, batch_size=8, max_length=32, ia3_sites=sites, calibrate=False)
        adapter, _ = train(backbone, examples, cfg, examples, progress=False)
        assert set(adapter.parts["ia3"].vectors) == expected
        assert all(not torch.equal(v, torch.ones_like(v)) for v in adapter.parts["ia3"].vectors.values())


def test_contrastive_warmup_trains_the_adapter_then_the_head_probes_its_features():
    backbone = tiny_backbone(seed=3)
    examples = synthetic(8, seed=1)
    cfg = TrainConfig(kind="ia3", contrastive_steps=30, contrastive_pairs=16, steps=0, lr=3e-2, max_length=32,
                      calibrate=False)
    adapter, report = train(backbone, examples, cfg, examples, progress=False)
    trained_hash = adapter.content_hash()
    losses = report["history"]["contrastive_loss"]
    assert len(losses) == 30 and report["steps"] == 0 and report["history"]["loss"] == []
    assert sum(losses[-5:]) < sum(losses[:5])  # the pair loss goes down
    vectors = adapter.parts["ia3"].vectors
    assert all(not torch.equal(v, torch.ones_like(v)) for v in vectors.values())
    # the head is the probe of the *adapted* features: refitting it on them changes nothing
    from switchboard.server.runtime.training.trainer import probe_head

    head = adapter.parts["head"]
    before = head.out_w.clone()
    index = {label: i for i, label in enumerate(adapter.labels)}
    probe_head(backbone, head, examples, index, cfg, params=single_task_params(adapter, readout=False))
    assert torch.allclose(head.out_w, before, atol=1e-5)
    # and differs from the probe of the frozen backbone's features
    probe_head(backbone, head, examples, index, cfg)
    assert not torch.allclose(head.out_w, before, atol=1e-3)
    # deterministic for a seed
    again, _ = train(tiny_backbone(seed=3), examples, cfg, examples, progress=False)
    assert again.content_hash() == trained_hash


def test_auto_recipe_is_few_shot_at_small_data_and_epochs_above_and_explicit_choices_stay():
    from switchboard.server.runtime.training.trainer import FEW_SHOT, resolve_recipe

    small, large = synthetic(32, seed=1), synthetic(33, seed=1)
    cfg, recipe = resolve_recipe(TrainConfig(kind="ia3"), small)
    assert recipe == "few-shot" and (cfg.steps, cfg.batch_size) == (FEW_SHOT["ia3"]["steps"], 8)
    assert cfg.ia3_sites == FEW_SHOT["ia3"]["ia3_sites"]
    cfg, recipe = resolve_recipe(TrainConfig(kind="houlsby"), small)  # SetFit's phases for a width-16 adapter
    assert recipe == "few-shot" and (cfg.width, cfg.contrastive_steps, cfg.steps) == (16, 150, 0)
    cfg, recipe = resolve_recipe(TrainConfig(kind="ia3"), large)
    assert recipe == "epochs" and cfg == TrainConfig(kind="ia3")
    pair_data = [((text, text), label) for text, label in small]  # pair tasks were not measured: epochs
    assert resolve_recipe(TrainConfig(kind="houlsby"), pair_data)[1] == "epochs"
    # explicit choices win: a recipe, a fixed number of steps, (IA)3 sites
    assert resolve_recipe(TrainConfig(kind="ia3", recipe="epochs"), small)[1] == "epochs"
    assert resolve_recipe(TrainConfig(kind="ia3", recipe="few-shot"), large)[1] == "few-shot"
    assert resolve_recipe(TrainConfig(kind="ia3", steps=7), small) == (TrainConfig(kind="ia3", steps=7), "fixed steps")
    assert resolve_recipe(TrainConfig(kind="ia3", ia3_sites=("v_out",)), small)[0].ia3_sites == ("v_out",)
    try:
        resolve_recipe(TrainConfig(recipe="fast"), small)
        raise AssertionError("an unknown recipe was accepted")
    except ValueError as e:
        assert "auto, few-shot or epochs" in str(e)


def test_the_few_shot_recipe_trains_on_every_example_and_says_what_it_scored():
    backbone = tiny_backbone(seed=3)
    examples = synthetic(4, seed=1)
    _, report = train(backbone, examples, TrainConfig(kind="ia3", max_length=32), progress=False)
    assert report["recipe"] == "few-shot" and report["eval_on"] == "training examples"
    assert report["train_examples"] == report["eval_examples"] == len(examples)
    assert report["steps"] == 200 and report["calibration"]["skipped"] == "scored on the training examples"
    _, report = train(backbone, examples, TrainConfig(kind="ia3", recipe="epochs", epochs=1, max_length=32),
                      progress=False)
    assert report["recipe"] == "epochs" and report["eval_on"] == "held-out split"
    assert report["train_examples"] + report["eval_examples"] == len(examples)
