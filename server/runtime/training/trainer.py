"""The training loop: (IA)3 vectors or Houlsby adapters + a head on the frozen backbone.

Training runs the very `encoder_forward` the server runs (one task's parameters broadcast over the
batch), so what is trained is exactly what is served. Recipes follow the papers: Houlsby — Adam,
warm-up over 10 % of steps then linear decay, batch 32, lr 1e-3 (adapters) ; (IA)3 — higher lr (3e-3),
fixed number of steps, good in the few-shot regime. The head starts from a linear probe (a softmax
regression on the frozen backbone's pooled features: "LP-FT", Kumar et al. 2022), so training starts
where frozen-embedding logistic regression ends and the adapter adds to it (docs/accuracy.md).
At ≤ 32 examples per class the default recipe ("auto") is the few-shot one (`FEW_SHOT`): for Houlsby,
SetFit's contrastive warm-up applied to the adapter, then the probe (docs/training.md).
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from switchboard.server.core.adapter import TaskAdapter
from switchboard.server.core.backbone import Backbone
from switchboard.server.core.forward import BatchParams, choice_token_log_probs, encode, encoder_forward
from switchboard.server.core.tokenize import Input, tokenize
from switchboard.server.core.tuners import KINDS_BY_NAME, READOUT
from switchboard.server.core.tuners.choices.config import choices_from_text
from switchboard.server.core.tuners.head.kind import MAX_TEMPERATURE, MIN_TEMPERATURE
from switchboard.server.core.tuners.head.layer import pool
from switchboard.server.runtime.training.data import Example, epoch_batches
from switchboard.server.runtime.training.tfew import tfew_loss

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
    recipe: str = "auto"  # auto: few-shot at ≤ few_shot_max_per_class examples per class, else epochs;
    #                       "few-shot" / "epochs" force one (an explicit `steps` is always a fixed schedule as given)
    few_shot_max_per_class: int = 32
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    ia3_sites: tuple[str, ...] | None = None  # None: the paper's (k_out, v_out, ffn_out_in); see tuners/ia3
    contrastive_steps: int = 0  # SetFit-style warm-up of the adapter before the probe (0: none)
    contrastive_pairs: int = 8  # pairs per warm-up step (half same-label, half different-label)
    contrastive_lr: float | None = None  # default: the adapter's lr
    # T5 backbones (rank classification, T-Few): the answer choices, one per label, and an optional prompt
    # template holding {text} once; labels of the examples must be among the choices
    choices: tuple[str, ...] | None = None
    template: str | None = None


# The small-data recipe per --kind (bench/fewshot.py, docs/accuracy.md "Issue 22"), trained on every example
# (no held-out split), replacing these fields of the config. Houlsby: SetFit's two phases for a width-16
# adapter (contrastive warm-up on pairs, then the probe head on the adapted features; no joint phase);
# (IA)3: T-Few's fixed schedule at all five sites; mixed (not measured): T-Few's schedule.
FEW_SHOT: dict[str, dict] = {
    "houlsby": {"width": 16, "contrastive_steps": 150, "contrastive_pairs": 8, "steps": 0, "head_init": "probe"},
    "ia3": {"steps": 200, "batch_size": 8, "ia3_sites": ("k_out", "v_out", "attn_out_in", "ffn_int_out", "ffn_out_in")},
    "mixed": {"steps": 200, "batch_size": 8},
}


# T-Few's own recipe (Liu et al. 2022): (IA)3 at k, v, wo of both T5 stacks, Adafactor-free AdamW at lr 3e-3,
# 1,000 steps of batch 8, loss = LM cross-entropy + unlikelihood on the wrong choices + length-normalised
# cross-entropy over the choices (training/tfew.py)
T_FEW: dict = {"steps": 1000, "batch_size": 8, "lr": 3e-3, "warmup": 0.06}


def resolve_recipe(cfg: TrainConfig, examples: list[Example], family: str = "bert",
                   sites: Collection[str] | None = None) -> tuple[TrainConfig, str]:
    """(the config actually trained, its recipe name): "fixed steps" when `cfg.steps` is given, "few-shot"
    when asked for or, with recipe "auto", when the median label has at most `few_shot_max_per_class`
    examples of single texts (pair tasks were not measured: auto keeps them on epochs); else "epochs"
    (early stop on an eval split). On a T5 backbone always "t-few": T-Few's recipe for every setting
    left at its default. `sites`: the backbone's sites (the few-shot recipe's (IA)3 sites are those of
    its five that the family has)."""
    if family == "t5":
        if cfg.kind != "ia3" or cfg.contrastive_steps:
            raise ValueError("a T5 backbone trains (IA)3 by T-Few's recipe: --kind ia3, no contrastive warm-up")
        settings = {k: v for k, v in T_FEW.items() if getattr(cfg, k) in (None, getattr(TrainConfig, k))}
        return replace(cfg, **settings), "t-few"
    if cfg.steps is not None:
        return cfg, "fixed steps"
    if cfg.recipe not in ("auto", "few-shot", "epochs"):
        raise ValueError(f"unknown recipe {cfg.recipe!r}: auto, few-shot or epochs")
    per_class = statistics.median(Counter(label for _, label in examples).values()) if examples else 0
    single_texts = all(isinstance(text, str) for text, _ in examples)
    if cfg.recipe == "few-shot" or (cfg.recipe == "auto" and single_texts and per_class <= cfg.few_shot_max_per_class):
        settings = dict(FEW_SHOT[cfg.kind])
        if cfg.kind == "ia3" and cfg.ia3_sites is not None:
            settings.pop("ia3_sites", None)  # sites asked for explicitly stay
        elif "ia3_sites" in settings and sites is not None:
            settings["ia3_sites"] = tuple(s for s in settings["ia3_sites"] if s in sites)
        return replace(cfg, **settings), "few-shot"
    return cfg, "epochs"


def new_adapter(backbone: Backbone, labels: list[str], cfg: TrainConfig, generator: torch.Generator) -> TaskAdapter:
    """Fresh weights for every kind the recipe trains; each kind reads the options it knows from cfg."""
    readout = "choices" if backbone.spec.family == "t5" else READOUT
    names = (readout, *TRAINED_KINDS[cfg.kind], *(("layer_norm",) if cfg.train_layer_norm else ()))
    options = {**vars(cfg), "num_labels": len(labels)}
    if readout == "choices":
        options["choices"] = choices_from_text(backbone.tokenizer, labels, cfg.template)
    parts = {name: KINDS_BY_NAME[name].new(backbone.spec, backbone.model, generator, options) for name in names}
    return TaskAdapter(labels=labels, parts=parts)


def single_task_params(adapter: TaskAdapter, readout: bool = True) -> BatchParams:
    """One task's parameters with a leading dim of 1, broadcast over the batch (differentiable);
    `readout=False`: the encoder's parts only (no head)."""
    return BatchParams({kind.name: kind.single_task(w) for kind, w in adapter.items()
                        if readout or not kind.is_readout})


def contrastive_pairs(examples: list[Example], n: int, rng: random.Random) -> list[tuple[int, int, float]]:
    """`n` pairs of example indices with a target: half same label (1.0), half different labels (0.0)."""
    by_label: dict[str, list[int]] = {}
    for i, (_, label) in enumerate(examples):
        by_label.setdefault(label, []).append(i)
    labels = sorted(by_label)
    pairable = [label for label in labels if len(by_label[label]) > 1]
    pairs = []
    for j in range(n):
        if j % 2 == 0 and pairable:
            a, b = rng.sample(by_label[rng.choice(pairable)], 2)
            pairs.append((a, b, 1.0))
        else:
            la, lb = rng.sample(labels, 2)
            pairs.append((rng.choice(by_label[la]), rng.choice(by_label[lb]), 0.0))
    return pairs


def contrastive_warmup(backbone: Backbone, adapter: TaskAdapter, examples: list[Example], cfg: TrainConfig,
                       lr: float, rng: random.Random) -> list[float]:
    """SetFit's first phase for the adapter instead of the body: pairs of same / different-label
    examples, cosine similarity of the adapted model's pooled features regressed on 1 / 0 (MSE,
    sentence-transformers' CosineSimilarityLoss). Trains the encoder parts only; returns the losses."""
    head = adapter.parts[READOUT]
    head_ids = set(map(id, KINDS_BY_NAME[READOUT].tensors(head).values()))
    body = [t for t in adapter.tensors().values() if id(t) not in head_ids]
    for t in body:
        t.requires_grad_(True)
    optimizer = torch.optim.AdamW(body, lr=lr, weight_decay=0.0)
    total = cfg.contrastive_steps
    warmup = max(1, int(total * cfg.warmup))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    pooler = getattr(backbone.model, "pooler", None)
    losses = []
    for _ in range(total):
        pairs = contrastive_pairs(examples, cfg.contrastive_pairs, rng)
        ids, mask = _batch(backbone, [examples[i][0] for a, b, _ in pairs for i in (a, b)], cfg.max_length)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            hidden = encode(backbone.model, ids, mask, single_task_params(adapter, readout=False))
        features = pool(hidden.float(), mask, head.pooling, pooler)
        cosine = F.cosine_similarity(features[0::2], features[1::2], dim=-1)
        loss = F.mse_loss(cosine, torch.tensor([t for _, _, t in pairs]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(round(loss.item(), 5))
    return losses


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
               cfg: TrainConfig, batch_size: int = 64, params: BatchParams | None = None) -> None:
    """Fit the head alone on pooled features (softmax regression, L-BFGS, L2), in place: of the frozen
    backbone, or of the backbone with `params` (an adapter's, after a contrastive warm-up)."""
    feats = []
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            ids, mask = _batch(backbone, [t for t, _ in examples[i:i + batch_size]], cfg.max_length)
            feats.append(pool(encode(backbone.model, ids, mask, params or BatchParams()), mask, head.pooling,
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
    """Every learned tensor (answer choices are token ids, never trained)."""
    tensors = [t for kind, w in adapter.items() if kind.name != "choices" for t in kind.tensors(w).values()]
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
    cfg, recipe = resolve_recipe(cfg, examples, backbone.spec.family, backbone.spec.sites)
    rank = backbone.spec.family == "t5"
    eval_on = "eval examples"
    if eval_examples is None and recipe in ("few-shot", "t-few"):
        # a fixed schedule selects nothing on an eval split: train on every example, report on them
        eval_examples, eval_on = examples, "training examples"
    elif eval_examples is None:
        examples, eval_examples = stratified_split(examples, cfg.eval_fraction, rng)
        eval_on = "held-out split"
    labels = sorted({label for _, label in examples} | {label for _, label in eval_examples})
    if rank:  # the answer choices are the labels, in the order given
        unknown = sorted(set(labels) - set(cfg.choices or ()))
        if not cfg.choices or unknown:
            raise ValueError(f"a T5 task needs answer choices covering every label; not among them: {unknown[:5]}")
        labels = list(cfg.choices)
    index = {label: i for i, label in enumerate(labels)}
    adapter = new_adapter(backbone, labels, cfg, generator)
    head = adapter.head
    start = time.time()
    lr = cfg.lr or (3e-3 if cfg.kind == "ia3" else 1e-3)
    contrastive = (contrastive_warmup(backbone, adapter, examples, cfg, cfg.contrastive_lr or lr, rng)
                   if cfg.contrastive_steps else [])
    if not rank and cfg.head_init == "probe" and not head.has_hidden:
        probe_head(backbone, head, examples, index, cfg,
                   params=single_task_params(adapter, readout=False) if contrastive else None)
    head_lr = cfg.head_lr or lr
    trained = _trainable(adapter)
    head_params = set(map(id, KINDS_BY_NAME[READOUT].tensors(head).values())) if not rank else set()
    groups = [{"params": [t for t in trained if id(t) not in head_params], "lr": lr},
              {"params": [t for t in trained if id(t) in head_params], "lr": head_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    steps_per_epoch = max(1, -(-len(examples) // cfg.batch_size))
    total = cfg.steps if cfg.steps is not None else steps_per_epoch * cfg.epochs  # 0: no joint phase
    warmup = max(1, int(total * cfg.warmup))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    eval_texts = [t for t, _ in eval_examples]
    eval_y = torch.tensor([index[label] for _, label in eval_examples])
    best, best_state, bad_epochs, step, epoch, best_epoch = -1.0, None, 0, 0, 0, 0
    history: dict[str, list] = {"loss": [], "eval": [], "contrastive_loss": contrastive}  # (step, eval acc) / epoch
    stopped_early: dict | None = None
    bar = tqdm(total=total, disable=not progress, desc=f"train {cfg.kind}")
    backbone.model.eval()
    while step < total:
        for batch in epoch_batches(examples, cfg.batch_size, rng, cfg.group_by_length):
            ids, mask = _batch(backbone, [t for t, _ in batch], cfg.max_length)
            y = torch.tensor([index[label] for _, label in batch])
            with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                if rank:
                    loss = tfew_loss(*choice_token_log_probs(backbone.model, ids, mask, single_task_params(adapter)), y)
                else:
                    logits = encoder_forward(backbone.model, ids, mask, single_task_params(adapter))
            if not rank:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
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
    calibration = calibrate(head, eval_logits, eval_y, cfg,
                            skip="scored on the training examples" if eval_on == "training examples" else None)
    resolved = {**cfg.__dict__, "lr": lr, "head_lr": head_lr, "total_steps": total, "warmup_steps": warmup,
                "steps_per_epoch": steps_per_epoch,
                "max_length": cfg.max_length or backbone.spec.max_length, "optimizer": "AdamW",
                "schedule": "linear warm-up, then linear decay to 0"}
    report = {**final, "kind": adapter.kind, "params": adapter.num_params, "train_examples": len(examples),
              "eval_examples": len(eval_examples), "steps": step, "train_seconds": time.time() - start,
              "labels": labels, "config": resolved, "stopped_early": stopped_early, "history": history,
              "calibration": calibration, "recipe": recipe, "eval_on": eval_on,
              "eval_predictions": [labels[i] for i in eval_pred.tolist()]}
    return adapter, report


def calibrate(head, eval_logits: torch.Tensor, eval_y: torch.Tensor, cfg: TrainConfig,  # noqa: ANN001
              skip: str | None = None) -> dict:
    """Fit and set the head's temperature on the eval split; the report's ECE before and after (on that
    same split: docs/accuracy.md measures it on held-out test data). `skip`: why not (temperature 1)."""
    before = expected_calibration_error(F.softmax(eval_logits, -1), eval_y) if len(eval_y) else None
    if skip or not cfg.calibrate or len(eval_y) < cfg.min_calibration_examples:
        head.temperature = 1.0
        return {"temperature": 1.0, "ece_before": before, "ece_after": before,
                "skipped": skip if skip else "off" if not cfg.calibrate else
                f"{len(eval_y)} eval examples; at least {cfg.min_calibration_examples} are needed"}
    head.temperature = fit_temperature(eval_logits, eval_y)
    after = expected_calibration_error(F.softmax(eval_logits / head.temperature, -1), eval_y)
    return {"temperature": head.temperature, "ece_before": before, "ece_after": after}
