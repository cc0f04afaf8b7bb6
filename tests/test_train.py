"""Training kit on a tiny model and a tiny synthetic set: it learns, it is deterministic, bad data gets
clear errors, and the engine serving the written file reproduces the trainer's own eval predictions."""

from __future__ import annotations

import json
import random

import pytest
import torch

from switchboard.adapter_store.formats import native
from switchboard.clients.cli import main
from switchboard.server.core.engine import Engine
from switchboard.server.runtime.training.data import DataError, epoch_batches, read_examples
from switchboard.server.runtime.training.trainer import TrainConfig, train
from tests.factories import tiny_backbone

WORDS = {"games": ["chess", "arcade", "puzzle", "multiplayer", "card", "board", "shooter", "strategy"],
         "net": ["dns", "http", "proxy", "firewall", "router", "socket", "tcp", "vpn"],
         "fonts": ["typeface", "glyph", "serif", "unicode", "truetype", "bitmap", "monospace", "opentype"]}


def synthetic(n_per_class: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    filler = ["a", "the", "tool", "for", "with", "and", "package", "simple"]
    out = []
    for label, words in WORDS.items():
        for _ in range(n_per_class):
            out.append((" ".join(rng.choice(words + filler) for _ in range(8)) + " " + rng.choice(words), label))
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("kind", ["ia3", "houlsby"])
def test_training_learns_and_the_server_reproduces_its_eval(kind, tmp_path):
    backbone = tiny_backbone(seed=3)
    cfg = TrainConfig(kind=kind, width=8, epochs=8, batch_size=16, seed=1, lr=1e-2, max_length=32)
    eval_set = synthetic(10, seed=99)
    adapter, report = train(backbone, synthetic(40, seed=1), cfg, eval_set, progress=False)
    assert report["accuracy"] >= 0.8, report["accuracy"]  # chance is 1/3
    assert report["params"] == adapter.num_params and set(report["per_class"]) == set(WORDS)
    # served through the engine from the written native file: the very same predictions
    blob = native.dumps(adapter, backbone.spec.fingerprint)
    engine = Engine(tiny_backbone(seed=3))
    slot = engine.load(native.loads(blob, backbone.spec.fingerprint)).slot
    enc = engine.tokenize([t for t, _ in eval_set], max_length=32)
    served = engine.forward(enc["input_ids"], enc["attention_mask"], torch.full((len(eval_set),), slot))
    assert [adapter.labels[i] for i in served.argmax(-1).tolist()] == report["eval_predictions"]
    # deterministic for a seed
    again, _ = train(tiny_backbone(seed=3), synthetic(40, seed=1), cfg, eval_set, progress=False)
    assert again.content_hash() == adapter.content_hash()


def test_bad_training_data_gets_clear_errors(tmp_path):
    cases = {"empty.csv": (b"", "no examples"),
             "one.csv": (b"text,label\na,x\nb,x\n", "two distinct labels"),
             "cols.csv": (b"sentence,label\na,x\nb,y\n", "missing column"),
             "latin.csv": ("text,label\ncaf\u00e9,x\n".encode("latin-1"), "UTF-8"),
             "bad.jsonl": (b'{"text": "a", "label": "x"}\n{oops\n', "invalid JSON"),
             "data.txt": (b"x", ".csv or .jsonl")}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=message):
            read_examples(path)


def test_cli_train_writes_an_uploadable_adapter_and_report(tmp_path, tiny_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": label}) for t, label in synthetic(20, seed=4)))
    out = tmp_path / "out"
    assert main(["train", "--data", str(data), "--kind", "ia3", "--out", str(out), "--model", str(tiny_dir[0]),
                 "--epochs", "2", "--max-length", "32"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {"accuracy", "macro_f1", "per_class", "params", "train_seconds", "history"} <= set(report)
    # the resolved hyper-parameters, not the defaults' placeholders
    assert report["config"]["lr"] == 3e-3 and report["config"]["head_lr"] == 3e-3
    assert report["config"]["max_length"] == 32 and report["config"]["total_steps"] >= report["steps"]
    assert len(report["history"]["loss"]) == report["steps"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter = native.loads((out / "adapter.safetensors").read_bytes(), tiny_dir[1].spec.fingerprint)
    assert adapter.kind == "ia3" and adapter.labels == sorted(WORDS)
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nonly,one\n")
    assert main(["train", "--data", str(bad), "--kind", "ia3", "--out", str(out)]) == 2


def test_length_grouped_batches_cover_every_example_once_and_cut_padding():
    rng = random.Random(0)
    examples = [("w " * rng.randint(1, 60), str(i)) for i in range(1000)]
    batches = list(epoch_batches(examples, 16, random.Random(1), group_by_length=True))
    assert sorted(label for b in batches for _, label in b) == sorted(label for _, label in examples)
    padded = lambda bs: sum(len(b) * max(len(t) for t, _ in b) for b in bs)  # noqa: E731
    plain = list(epoch_batches(examples, 16, random.Random(1), group_by_length=False))
    assert padded(batches) < 0.8 * padded(plain)


def test_the_eval_split_is_stratified_and_says_what_it_could_not_cover(caplog):
    from switchboard.server.runtime.training.trainer import stratified_split

    examples = [(f"g{i}", "games") for i in range(30)] + [(f"n{i}", "net") for i in range(5)] + [("f", "fonts")]
    train_part, eval_part = stratified_split(examples, 0.1, random.Random(0))
    assert sorted(train_part + eval_part) == sorted(examples)
    held = [label for _, label in eval_part]
    assert held.count("games") == 3 and held.count("net") == 1 and "fonts" not in held
    assert "fonts" in caplog.text and "single example" in caplog.text


def test_early_stopping_says_so_and_keeps_the_best_epoch(caplog):
    import logging

    caplog.set_level(logging.INFO)
    backbone = tiny_backbone(seed=3)
    examples = synthetic(6, seed=1)
    cfg = TrainConfig(kind="ia3", recipe="epochs", epochs=30, patience=1, batch_size=8, lr=1e-9, head_init="random",
                      max_length=32)  # nothing improves after epoch 1
    _, report = train(backbone, examples, cfg, synthetic(3, seed=2), progress=False)
    stop = report["stopped_early"]
    assert stop is not None and stop["best_epoch"] == 1 and stop["epoch"] == 2 and report["steps"] < 30 * 3
    assert f"stopped early at step {stop['step']}" in caplog.text and "keeping epoch 1" in caplog.text
    assert len(report["history"]["eval"]) == 2
