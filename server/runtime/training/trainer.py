"""The training loop: (IA)3 vectors or Houlsby adapters + a head on the frozen backbone.

Training runs the very `encoder_forward` the server runs (one task's parameters broadcast over the
batch), so what is trained is exactly what is served. Recipes follow the papers: Houlsby — Adam,
warm-up over 10 % of steps then linear decay, batch 32, lr 1e-3 (adapters) ; (IA)3 — higher lr (3e-3),
fixed number of steps, good in the few-shot regime. The head starts from a linear probe (a softmax
regression on the frozen backbone's pooled features: "LP-FT", Kumar et al. 2022), so training starts
where frozen-embedding logistic regression ends and the adapter adds to it (docs/accuracy.md).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from switchboard.server.core.adapter import TaskAdapter
from switchboard.server.core.backbone import Backbone
from switchboard.server.core.forward import BatchParams, encode, encoder_forward
from switchboard.server.core.tokenize import Input, tokenize
from switchboard.server.core.tuners import KINDS_BY_NAME, READOUT
from switchboard.server.core.tuners.head.kind import MAX_TEMPERATURE, MIN_TEMPERATURE
from switchboard.server.core.tuners.head.layer import pool
from switchboard.server.runtime.training.data import Example, epoch_batches

log = logging.getLogger(__name__)

# --kind → the adapter kinds trained (the head always is; per-task LayerNorm on request)
TRAINED_KINDS: dict[str, tuple[str, ...]] = {"ia3": ("ia3",), "houlsby": ("houlsby",), "mixed": ("ia3", "houlsby")}


@dataclass
class TrainConfig:
    kind: str = "ia3"
    width: int = 64
    activation: str = "gelu"
    train_layer_norm: bool = False
    pooling: str = "mean"
    epochs: int = 10
    steps: int | None = None
    batch_size: int = 32
    lr: float | None = None
    warmup: float = 0.1
    eval_fraction: float = 0.1
    patience: int = 3
    seed: int = 0
    max_length: int | None = None  # None: the backbone's limit, as the server truncates by default
    precision: str = "fp32"  # "bf16": autocast matmuls in training (weights and evaluation stay fp32)
    group_by_length: bool = True  # batches of similar length: less padding, same examples per epoch
    head_init: str = "probe"  # probe: a linear probe on frozen features (LP-FT); random: small normal init
    head_lr: float | None = None  # default: the adapter's lr
    probe_weight_decay: float = 1e-3  # the probe's L2 penalty (logistic regression's 1/C, per example)
    calibrate: bool = True  # fit the head's temperature on the eval split (probabilities, not raw scores)
    min_calibration_examples: int = 20  # fewer eval examples: temperature 1 (a fit on a handful overfits)


def new_adapter(backbone: Backbone, labels: list[str], cfg: TrainConfig, generator: torch.Generator) -> TaskAdapter:
    """Fresh weights for every kind the recipe trains; each kind reads the options it knows from cfg."""
    names = (READOUT, *TRAINED_KINDS[cfg.kind], *(("layer_norm",) if cfg.train_layer_norm else ()))
    options = {**vars(cfg), "num_labels": len(labels)}
    parts = {name: KINDS_BY_NAME[name].new(backbone.spec, backbone.model, generator, options) for name in names}
    return TaskAdapter(labels=labels, parts=parts)


def single_task_params(adapter: TaskAdapter) -> BatchParams:
    """One task's parameters with a leading dim of 1, broadcast over the batch (differentiable)."""
    return BatchParams({kind.name: kind.single_task(w) for kind, w in adapter.items()})


def stratified_split(examples: list[Example], fraction: float,
                     rng: random.Random) -> tuple[list[Example], list[Example]]:
    """(train, eval): about `fraction` of every label's examples held out, at least one per label that
    has two or more; a label with a single example stays in training (and a warning says so)."""
    by_label: dict[str, list[Example]] = {}
    for example in examples:
        by_label.setdefault(example[1], []).append(example)
    train_part, eval_part, alone = [], [], []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_eval = 0 if len(group) < 2 else max(1, round(len(group) * fraction))
        eval_part += group[:n_eval]
        train_part += group[n_eval:]
        if n_eval == 0:
            alone.append(label)
    if alone:
        log.warning("labels with a single example are not in the eval split (give --eval, or more data): %s",
                    ", ".join(alone[:10]))
    rng.shuffle(train_part)
    rng.shuffle(eval_part)
    return train_part, eval_part


def probe_head(backbone: Backbone, head, examples: list[Example], index: dict[str, int],  # noqa: ANN001
               cfg: TrainConfig, batch_size: int = 64) -> None:
    """Fit the head alone on the frozen backbone's pooled features (softmax regression, L-BFGS, L2), in place."""
    feats = []
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            ids, mask = _batch(backbone, [t for t, _ in examples[i:i + batch_size]], cfg.max_length)
            feats.append(pool(encode(backbone.model, ids, mask, BatchParams()), mask, head.pooling,
                              getattr(backbone.model, "pooler", None)).float())
    x = torch.cat(feats)
    y = torch.tensor([index[label] for _, label in examples])
    w = torch.zeros_like(head.out_w, requires_grad=True)
    b = torch.zeros_like(head.out_b, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w.t() + b, y) + cfg.probe_weight_decay * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        head.out_w.copy_(w)
        head.out_b.copy_(b)


def _batch(backbone: Backbone, texts: list[Input], max_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = tokenize(backbone.tokenizer, texts, max_length or backbone.spec.max_length)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _trainable(adapter: TaskAdapter) -> list[torch.Tensor]:
    tensors = list(adapter.tensors().values())
    for t in tensors:
        t.requires_grad_(True)
    return tensors


def logits_of(backbone: Backbone, adapter: TaskAdapter, texts: list[Input], max_length: int | None = None,
              batch_size: int = 64) -> torch.Tensor:
    """The task's logits [N, C] (raw: no temperature), as the server computes them."""
    out = []
    with torch.inference_mode():
        params = single_task_params(adapter)
        for i in range(0, len(texts), batch_size):
            ids, mask = _batch(backbone, texts[i:i + batch_size], max_length)
            out.append(encoder_forward(backbone.model, ids, mask, params).float())
    return torch.cat(out) if out else torch.empty(0, adapter.num_labels)


def predict(backbone: Backbone, adapter: TaskAdapter, texts: list[Input], max_length: int | None = None,
            batch_size: int = 64) -> torch.Tensor:
    return logits_of(backbone, adapter, texts, max_length, batch_size).argmax(-1)


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimising the NLL of softmax(logits / T) on held-out
    rows; argmax, hence accuracy, is unchanged."""
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    return min(MAX_TEMPERATURE, max(MIN_TEMPERATURE, t)) if t == t else 1.0


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """ECE: |accuracy − confidence| of the top label, averaged over equal-width confidence bins, by count."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += float(inside.float().mean()) * abs(float(correct[inside].mean()) - float(confidence[inside].mean()))
    return ece


def scores(y_true: torch.Tensor, y_pred: torch.Tensor, labels: list[str]) -> dict:
    per_class, f1s = {}, []
    for i, name in enumerate(labels):
        tp = int(((y_pred == i) & (y_true == i)).sum())
        fp = int(((y_pred == i) & (y_true != i)).sum())
        fn = int(((y_pred != i) & (y_true == i)).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
        f1s.append(f1)
    return {"accuracy": float((y_true == y_pred).float().mean()), "macro_f1": sum(f1s) / len(f1s),
            "per_class": per_class}


StepCallback = Callable[[int, int, float], None]


def train(backbone: Backbone, examples: list[Example], cfg: TrainConfig,
          eval_examples: list[Example] | None = None, progress: bool = True,
          on_step: StepCallback | None = None) -> tuple[TaskAdapter, dict]:
    """Train; with `cfg.steps` a fixed schedule (final weights), else epochs with early stop on eval accuracy.

    `on_step(step, total, loss)` is called after every step; raising from it aborts training.
    """
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    examples = list(examples)
    if eval_examples is None:
        examples, eval_examples = stratified_split(examples, cfg.eval_fraction, rng)
    labels = sorted({label for _, label in examples} | {label for _, label in eval_examples})
    index = {label: i for i, label in enumerate(labels)}
    adapter = new_adapter(backbone, labels, cfg, generator)
    head = adapter.parts[READOUT]
    if cfg.head_init == "probe" and not head.has_hidden:
        probe_head(backbone, head, examples, index, cfg)
    lr = cfg.lr or (3e-3 if cfg.kind == "ia3" else 1e-3)
    head_lr = cfg.head_lr or lr
    _trainable(adapter)
    head_params = set(map(id, KINDS_BY_NAME[READOUT].tensors(head).values()))
    groups = [{"params": [t for t in adapter.tensors().values() if id(t) not in head_params], "lr": lr},
              {"params": [t for t in adapter.tensors().values() if id(t) in head_params], "lr": head_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    steps_per_epoch = max(1, -(-len(examples) // cfg.batch_size))
    total = cfg.steps or steps_per_epoch * cfg.epochs
    warmup = max(1, int(total * cfg.warmup))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    eval_texts = [t for t, _ in eval_examples]
    eval_y = torch.tensor([index[label] for _, label in eval_examples])
    best, best_state, bad_epochs, step, epoch, best_epoch = -1.0, None, 0, 0, 0, 0
    history: dict[str, list] = {"loss": [], "eval": []}  # loss per step; (step, eval accuracy) per epoch
    stopped_early: dict | None = None
    start = time.time()
    bar = tqdm(total=total, disable=not progress, desc=f"train {cfg.kind}")
    backbone.model.eval()
    while step < total:
        for batch in epoch_batches(examples, cfg.batch_size, rng, cfg.group_by_length):
            ids, mask = _batch(backbone, [t for t, _ in batch], cfg.max_length)
            with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                logits = encoder_forward(backbone.model, ids, mask, single_task_params(adapter))
            loss = F.cross_entropy(logits.float(), torch.tensor([index[label] for _, label in batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            history["loss"].append(round(loss.item(), 5))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if on_step is not None:
                on_step(step, total, loss.item())
            if step >= total:
                break
        epoch += 1
        if cfg.steps is not None:
            continue  # fixed schedule: the final weights, no selection on the eval set
        accuracy = scores(eval_y, predict(backbone, adapter, eval_texts, cfg.max_length), labels)["accuracy"]
        history["eval"].append([step, accuracy])
        if accuracy > best:
            best, bad_epochs, best_epoch = accuracy, 0, epoch
            best_state = {k: v.detach().clone() for k, v in adapter.tensors().items()}
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience and step < total:
                stopped_early = {"step": step, "of": total, "epoch": epoch, "best_epoch": best_epoch,
                                 "best_eval_accuracy": best}
                message = (f"stopped early at step {step} of {total} (epoch {epoch}): eval accuracy has not improved "
                           f"for {cfg.patience} epochs; keeping epoch {best_epoch} (eval accuracy {best:.4f})")
                bar.write(message) if progress else log.info(message)
                break  # early stop on the eval metric
    bar.close()
    with torch.no_grad():
        for name, tensor in adapter.tensors().items():
            if best_state is not None:
                tensor.copy_(best_state[name])
            tensor.requires_grad_(False)
    eval_logits = logits_of(backbone, adapter, eval_texts, cfg.max_length)
    eval_pred = eval_logits.argmax(-1)
    final = scores(eval_y, eval_pred, labels)
    calibration = calibrate(head, eval_logits, eval_y, cfg)
    resolved = {**cfg.__dict__, "lr": lr, "head_lr": head_lr, "total_steps": total, "warmup_steps": warmup,
                "steps_per_epoch": steps_per_epoch,
                "max_length": cfg.max_length or backbone.spec.max_length, "optimizer": "AdamW",
                "schedule": "linear warm-up, then linear decay to 0"}
    report = {**final, "kind": adapter.kind, "params": adapter.num_params, "train_examples": len(examples),
              "eval_examples": len(eval_examples), "steps": step, "train_seconds": time.time() - start,
              "labels": labels, "config": resolved, "stopped_early": stopped_early, "history": history,
              "calibration": calibration,
              "eval_predictions": [labels[i] for i in eval_pred.tolist()]}
    return adapter, report


def calibrate(head, eval_logits: torch.Tensor, eval_y: torch.Tensor, cfg: TrainConfig) -> dict:  # noqa: ANN001
    """Fit and set the head's temperature on the eval split; the report's ECE before and after (on that
    same split: docs/accuracy.md measures it on held-out test data)."""
    before = expected_calibration_error(F.softmax(eval_logits, -1), eval_y) if len(eval_y) else None
    if not cfg.calibrate or len(eval_y) < cfg.min_calibration_examples:
        head.temperature = 1.0
        return {"temperature": 1.0, "ece_before": before, "ece_after": before,
                "skipped": "off" if not cfg.calibrate else
                f"{len(eval_y)} eval examples; at least {cfg.min_calibration_examples} are needed"}
    head.temperature = fit_temperature(eval_logits, eval_y)
    after = expected_calibration_error(F.softmax(eval_logits / head.temperature, -1), eval_y)
    return {"temperature": head.temperature, "ece_before": before, "ece_after": after}
