"""Accuracy on real data: adapters trained with `clients.train`, served over HTTP, vs two anchors.

Data: the Debian-sections topical set (DESIGN.md §7, built by `bench.debian_sections`, split by source
package into train / dev / test). In one run, on one machine:
- anchor 1: frozen MiniLM, mean-pooled + L2-normalised embeddings, scikit-learn logistic regression
  (C picked on dev);
- anchor 2: full fine-tuning of the whole backbone + a linear head (AdamW, warm-up + linear decay,
  best dev epoch);
- (IA)³ and Houlsby m=64 adapters trained by `clients.train.train` (early stop on dev), uploaded to a
  real `switchboard serve` process and scored on test over HTTP — served predictions are also compared
  with the trainer's own, on dev (the trainer's eval set) and on test;
- few-shot: k examples per class (8, 32, 128), (IA)³ with the fixed-steps recipe vs logistic regression
  on the same k.

    python -m bench.accuracy --quick   # a few minutes: subsampled data, short training
    python -m bench.accuracy           # the full run (~1 h on 2 cores)

Results go to bench/out/accuracy.json; the markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from transformers import AutoModel

from bench.debian_sections import load as load_splits
from switchboard.adapter_store.formats import native
from switchboard.clients.local_server import running_server
from switchboard.clients.sdk import Client
from switchboard.server.core.backbone import Backbone, default_model_path, load_backbone
from switchboard.server.runtime.training.data import epoch_batches
from switchboard.server.runtime.training.trainer import TrainConfig, predict, scores, train

Examples = list[tuple[str, str]]


def as_examples(rows: list[dict]) -> Examples:
    return [(r["text"], r["label"]) for r in rows]


def metrics(labels: list[str], gold: list[str], pred: list[str]) -> dict:
    index = {label: i for i, label in enumerate(labels)}
    out = scores(torch.tensor([index[g] for g in gold]), torch.tensor([index[p] for p in pred]), labels)
    return {"accuracy": out["accuracy"], "macro_f1": out["macro_f1"]}


def embed(backbone: Backbone, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Frozen mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe for MiniLM)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), backbone.spec.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            enc = backbone.tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=max_length,
                                     return_tensors="pt")
            hidden = backbone.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            out[idx] = pooled.numpy()
    return out


def logistic_regression(x_train: np.ndarray, y_train: list[str], x_dev: np.ndarray, y_dev: list[str],
                        x_test: np.ndarray) -> tuple[list[str], float, float]:
    """Fit for each C, keep the best on dev; returns (test predictions, C, fit seconds of the kept one)."""
    best = (-1.0, None, 0.0, 0.0)
    for c in (1.0, 10.0, 100.0):
        start = time.time()
        model = LogisticRegression(C=c, max_iter=3000).fit(x_train, y_train)
        seconds = time.time() - start
        dev_accuracy = float((model.predict(x_dev) == np.array(y_dev)).mean())
        if dev_accuracy > best[0]:
            best = (dev_accuracy, model, c, seconds)
    _, model, c, seconds = best
    return list(model.predict(x_test)), c, seconds


class FullFineTune(torch.nn.Module):
    """The whole encoder + a linear head on mean pooling, all trainable."""

    def __init__(self, model_path: Path, num_labels: int) -> None:
        super().__init__()
        self.encoder = AutoModel.from_pretrained(model_path, local_files_only=True, attn_implementation="sdpa")
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def full_fine_tune(backbone: Backbone, train_ex: Examples, dev_ex: Examples, test_texts: list[str],
                   labels: list[str], epochs: int, max_length: int, lr: float = 5e-5, batch_size: int = 32,
                   seed: int = 0) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    index = {label: i for i, label in enumerate(labels)}
    model = FullFineTune(default_model_path(), len(labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    total = epochs * -(-len(train_ex) // batch_size)
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))

    def run(texts: list[str]) -> list[str]:
        model.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), 64):
                enc = backbone.tokenizer(texts[i:i + 64], padding=True, truncation=True, max_length=max_length,
                                         return_tensors="pt")
                out += [labels[j] for j in model(enc["input_ids"], enc["attention_mask"]).argmax(-1).tolist()]
        return out

    best, best_state, start = -1.0, None, time.time()
    for _ in range(epochs):
        model.train()
        for batch in epoch_batches(train_ex, batch_size, rng, group_by_length=True):
            enc = backbone.tokenizer([t for t, _ in batch], padding=True, truncation=True, max_length=max_length,
                                     return_tensors="pt")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(enc["input_ids"], enc["attention_mask"])
            loss = F.cross_entropy(logits.float(), torch.tensor([index[label] for _, label in batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        dev_accuracy = metrics(labels, [label for _, label in dev_ex], run([t for t, _ in dev_ex]))["accuracy"]
        print(f"  full fine-tuning: epoch dev accuracy {dev_accuracy:.4f}", flush=True)
        if dev_accuracy > best:
            best, best_state = dev_accuracy, {k: v.detach().clone() for k, v in model.state_dict().items()}
    seconds = time.time() - start
    model.load_state_dict(best_state)
    params = sum(p.numel() for p in model.parameters())
    return {"test_predictions": run(test_texts), "params": params, "train_seconds": seconds}


def served_predictions(url: str, task: str, texts: list[str]) -> list[str]:
    out: list[str] = []
    with Client(url, timeout=300) as client:
        for i in range(0, len(texts), 64):
            out += [preds[0].label for preds in client.classify(task, texts[i:i + 64], top_k=1).predictions]
    return out


def per_class(examples: Examples, k: int, seed: int) -> Examples:
    rng = random.Random(seed)
    by_label: dict[str, list[tuple[str, str]]] = {}
    for ex in examples:
        by_label.setdefault(ex[1], []).append(ex)
    out = []
    for label in sorted(by_label):
        members = by_label[label]
        out += rng.sample(members, min(k, len(members)))
    rng.shuffle(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", type=Path, default=Path("bench/data/debian-sections"))
    parser.add_argument("--out", type=Path, default=Path("bench/out/accuracy.json"))
    parser.add_argument("--max-length", type=int, default=128, help="training and serving truncation (82 %% fit)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["full", "fewshot", "ia3", "houlsby"])
    parser.add_argument("--ia3-lr", type=float, default=None, help="(IA)3 adapter lr (default: the trainer's)")
    parser.add_argument("--ia3-head-lr", type=float, default=None, help="(IA)3 head lr (default: the trainer's)")
    parser.add_argument("--ia3-epochs", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    splits = load_splits(args.data)
    train_ex, dev_ex, test_ex = (as_examples(splits[s]) for s in ("train", "dev", "test"))
    if args.quick:
        train_ex, dev_ex, test_ex = train_ex[:720], dev_ex[:200], test_ex[:300]
    labels = sorted({label for _, label in train_ex})
    test_texts, test_gold = [t for t, _ in test_ex], [label for _, label in test_ex]
    backbone = load_backbone(None)
    backbone_params = sum(p.numel() for p in backbone.model.parameters())
    results: dict = {"data": {"train": len(train_ex), "dev": len(dev_ex), "test": len(test_ex),
                              "classes": len(labels)},
                     "backbone_params": backbone_params, "max_length": args.max_length, "quick": args.quick,
                     "rows": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def record(name: str, row: dict) -> None:
        results["rows"][name] = row
        print(f"{name}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in row.items()), flush=True)
        args.out.write_text(json.dumps(results, indent=1))

    # Anchor 1: frozen embeddings + logistic regression.
    start = time.time()
    vectors = embed(backbone, [t for t, _ in train_ex + dev_ex + test_ex], args.max_length)
    embed_seconds = time.time() - start
    x_train, x_dev, x_test = np.split(vectors, [len(train_ex), len(train_ex) + len(dev_ex)])
    y_train, y_dev = [label for _, label in train_ex], [label for _, label in dev_ex]
    pred, c, fit_seconds = logistic_regression(x_train, y_train, x_dev, y_dev, x_test)
    record("frozen embeddings + logistic regression",
           {**metrics(labels, test_gold, pred), "params": len(labels) * (backbone.spec.hidden_size + 1),
            "train_seconds": embed_seconds + fit_seconds, "C": c})

    # Adapters: trained here, served by a real server, scored over HTTP.
    epochs = 1 if args.quick else {"ia3": args.ia3_epochs, "houlsby": 5}
    configs = {
        "ia3": TrainConfig(kind="ia3", epochs=epochs if args.quick else epochs["ia3"], patience=2,
                           max_length=args.max_length, precision="bf16", lr=args.ia3_lr, head_lr=args.ia3_head_lr),
        "houlsby": TrainConfig(kind="houlsby", width=64, epochs=epochs if args.quick else epochs["houlsby"],
                               patience=2, max_length=args.max_length, precision="bf16"),
    }
    trained = {}
    configs = {name: cfg for name, cfg in configs.items() if name not in args.skip}
    for name, cfg in configs.items():
        adapter, report = train(backbone, train_ex, cfg, dev_ex, progress=False)
        trained[name] = (adapter, report, predict(backbone, adapter, test_texts, args.max_length))
        print(f"  {name}: dev accuracy {report['accuracy']:.4f} after {report['steps']} steps, "
              f"{report['train_seconds']:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp, \
            running_server(Path(tmp), extra_args=["--max-length", str(args.max_length)]) as (url, _):
        for name, (adapter, report, trainer_test) in trained.items():
            path = Path(tmp) / f"{name}.safetensors"
            path.write_bytes(native.dumps(adapter, backbone.spec.fingerprint))
            with Client(url) as client:
                client.upload(f"debian-{name}", path)
            served_test = served_predictions(url, f"debian-{name}", test_texts)
            served_dev = served_predictions(url, f"debian-{name}", [t for t, _ in dev_ex])
            trainer_test_labels = [report["labels"][i] for i in trainer_test.tolist()]
            row = {**metrics(labels, test_gold, served_test), "params": adapter.num_params,
                   "train_seconds": report["train_seconds"], "steps": report["steps"],
                   "dev_accuracy_trainer": report["accuracy"],
                   "dev_accuracy_served": metrics(labels, [label for _, label in dev_ex], served_dev)["accuracy"],
                   "dev_same_predictions": sum(a == b for a, b in zip(served_dev, report["eval_predictions"])),
                   "test_same_predictions": sum(a == b for a, b in zip(served_test, trainer_test_labels))}
            record(f"{name} (served over HTTP)", row)

    # Anchor 2: full fine-tuning.
    if "full" not in args.skip:
        ft = full_fine_tune(backbone, train_ex, dev_ex, test_texts, labels, epochs=1 if args.quick else 3,
                            max_length=args.max_length)
        record("full fine-tuning", {**metrics(labels, test_gold, ft["test_predictions"]), "params": ft["params"],
                                    "train_seconds": ft["train_seconds"]})

    # Few-shot: k per class, (IA)3 fixed steps vs logistic regression on the same examples.
    if "fewshot" not in args.skip:
        position = {ex: i for i, ex in enumerate(train_ex)}
        for k in (8, 32) if args.quick else (8, 32, 128):
            subset = per_class(train_ex, k, seed=k)
            rows = [position[ex] for ex in subset]
            pred, c, _ = logistic_regression(x_train[rows], [label for _, label in subset], x_dev, y_dev, x_test)
            record(f"few-shot k={k}: logistic regression", {**metrics(labels, test_gold, pred), "C": c})
            cfg = TrainConfig(kind="ia3", steps=60 if args.quick else 300, batch_size=16,
                              max_length=args.max_length, precision="bf16")
            adapter, report = train(backbone, subset, cfg, dev_ex, progress=False)
            pred_ids = predict(backbone, adapter, test_texts, args.max_length).tolist()
            record(f"few-shot k={k}: ia3", {**metrics(labels, test_gold, [report["labels"][i] for i in pred_ids]),
                                            "steps": report["steps"], "train_seconds": report["train_seconds"]})

    print("\n| method | params / task | % of backbone | test accuracy | macro-F1 | train time (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in results["rows"].items():
        params = row.get("params")
        share = f"{100 * params / backbone_params:.3f}" if params else ""
        print(f"| {name} | {params or ''} | {share} | {row['accuracy']:.4f} | {row['macro_f1']:.4f} | "
              f"{row.get('train_seconds', 0):.0f} |")


if __name__ == "__main__":
    main()
