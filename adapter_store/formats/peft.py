"""PEFT (IA)3 adapters: adapter_config.json + adapter_model.safetensors, for every backbone family.

Feed-forward modules scale their input, others their output (PEFT's IA3Layer): a vector on module M
is the family's "in" or "out" site at M (core/families/). The head is what a *ForSequenceClassification
model saves in `modules_to_save`, read per family (`_HEADS`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from switchboard.adapter_store.formats.module_patterns import layer_tensor_key, module_matcher
from switchboard.adapter_store.limits import UploadLimits, check_count
from switchboard.server.core.adapter import AdapterValidationError, TaskAdapter
from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.core.families import family_named
from switchboard.server.core.tuners.head.config import HeadWeights
from switchboard.server.core.tuners.ia3.config import Ia3Weights

_WRAPPER = re.compile(r"^base_model\.model\.")


def parse(config: dict, tensors: dict[str, torch.Tensor], spec: BackboneSpec,
          labels: list[str] | None = None, limits: UploadLimits | None = None) -> TaskAdapter:
    limits = limits or UploadLimits()
    if config.get("peft_type") != "IA3":
        raise AdapterValidationError(
            f"unsupported PEFT adapter type {config.get('peft_type')!r}: Switchboard serves PEFT IA3 adapters")
    family = family_named(spec.family)
    if family is None:
        raise AdapterValidationError(f"no backbone family {spec.family!r}")
    sites = {(ref.stack, ref.path, ref.where): site for site, ref in family.sites.items()
             if ref.part is None and ref.where != "norm"}
    layer_key = layer_tensor_key(family.stacks, r"[A-Za-z_0-9.]+", "ia3_l")
    is_feedforward = module_matcher(config.get("feedforward_modules"), "feedforward_modules")
    seen: dict[tuple[str, int], str] = {}
    vectors: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = _WRAPPER.sub("", key)
        match = layer_key.match(name)
        if match:
            stack, layer, module = match.group("stack"), int(match.group("layer")), match.group("module")
            feedforward = is_feedforward(name.removesuffix(".ia3_l"))
            site = sites.get((stack, module, "in" if feedforward else "out"))
            if site is None:
                raise AdapterValidationError(
                    f"{key}: (IA)3 on {module} ({'input' if feedforward else 'output'} scaling) is not a site "
                    f"Switchboard supports on the {family.name} family")
            if (site, layer) in seen:
                raise AdapterValidationError(f"{key} and {seen[site, layer]} both scale layer {layer}'s {site}")
            seen[site, layer] = key
            layers, dim = spec.site_layers(site), spec.site_dim(site)
            if not 0 <= layer < layers:
                raise AdapterValidationError(f"{key}: layer {layer} outside the backbone's {layers} layers")
            if not tensor.is_floating_point():
                raise AdapterValidationError(f"{key}: dtype {tensor.dtype} is not a float dtype")
            if tensor.numel() != dim or tensor.dim() != 2 or 1 not in tensor.shape:
                raise AdapterValidationError(f"{key}: shape {tuple(tensor.shape)} does not fit dimension {dim}")
            vec = vectors.setdefault(site, torch.ones(layers, dim))
            vec[layer] = tensor.reshape(-1).float()
            continue
        if name.split(".", 1)[0] in _HEAD_MODULES:
            head[name] = tensor.float()
            continue
        raise AdapterValidationError(f"unexpected tensor {key} in a PEFT IA3 adapter")
    if not vectors:
        raise AdapterValidationError("the PEFT adapter holds no ia3_l vectors")
    parts: dict[str, object] = {"ia3": Ia3Weights(vectors)}
    if spec.family == "t5":
        if head:
            raise AdapterValidationError(f"a T5 adapter classifies by its answer choices; unexpected {sorted(head)[0]}")
        return TaskAdapter(labels=list(labels or []), parts=parts, metadata={"source_format": "peft"})
    if not head:
        raise AdapterValidationError(
            "the PEFT adapter has no classification head: save it from a *ForSequenceClassification model "
            f"(task_type SEQ_CLS) with modules_to_save {_HEAD_HINT.get(spec.family, ['classifier'])}")
    head_weights = _HEADS.get(spec.family, _bert_head)(head, spec)
    names = labels or [f"LABEL_{i}" for i in range(check_count(head_weights.num_labels, limits, "classifier"))]
    parts["head"] = head_weights
    return TaskAdapter(labels=list(names), parts=parts, metadata={"source_format": "peft"})


_HEAD_MODULES = frozenset({"classifier", "pre_classifier", "pooler", "head", "score"})
_HEAD_HINT = {"distilbert": ["pre_classifier", "classifier"], "deberta-v2": ["pooler", "classifier"],
              "modernbert": ["head", "classifier"], "decoder": ["score"]}


def _take(head: dict[str, torch.Tensor], spec: BackboneSpec, *names: str) -> dict[str, torch.Tensor]:
    missing = [n for n in names if n not in head]
    if missing:
        raise AdapterValidationError(
            f"the {spec.family} head needs {missing} (save with modules_to_save "
            f"{_HEAD_HINT.get(spec.family, ['classifier'])}); the file has {sorted(head)}")
    return {n: head.pop(n) for n in names}


def _no_more(head: dict[str, torch.Tensor]) -> None:
    if head:
        raise AdapterValidationError(f"unrecognised classifier tensors {sorted(head)}")


def _bert_head(head: dict[str, torch.Tensor], spec: BackboneSpec) -> HeadWeights:
    """BERT: classifier.{weight,bias} on the pooler. RoBERTa, XLM-R, MPNet: classifier.dense (tanh) +
    out_proj on the first token; ELECTRA the same with gelu."""
    if set(head) == {"classifier.weight", "classifier.bias"}:
        return HeadWeights(out_w=head["classifier.weight"], out_b=head["classifier.bias"], pooling="pooler")
    t = _take(head, spec, "classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
              "classifier.out_proj.bias")
    _no_more(head)
    return HeadWeights(out_w=t["classifier.out_proj.weight"], out_b=t["classifier.out_proj.bias"], pooling="cls",
                       hidden_w=t["classifier.dense.weight"], hidden_b=t["classifier.dense.bias"],
                       activation="gelu" if spec.model_type == "electra" else "tanh")


def _distilbert_head(head: dict[str, torch.Tensor], spec: BackboneSpec) -> HeadWeights:
    """pre_classifier → ReLU → classifier, on the first token."""
    t = _take(head, spec, "pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias")
    _no_more(head)
    return HeadWeights(out_w=t["classifier.weight"], out_b=t["classifier.bias"], pooling="cls",
                       hidden_w=t["pre_classifier.weight"], hidden_b=t["pre_classifier.bias"], activation="relu")


def _deberta_head(head: dict[str, torch.Tensor], spec: BackboneSpec) -> HeadWeights:
    """ContextPooler (pooler.dense → gelu, DeBERTa's pooler_hidden_act) on the first token → classifier."""
    t = _take(head, spec, "pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias")
    _no_more(head)
    return HeadWeights(out_w=t["classifier.weight"], out_b=t["classifier.bias"], pooling="cls",
                       hidden_w=t["pooler.dense.weight"], hidden_b=t["pooler.dense.bias"], activation="gelu")


def _modernbert_head(head: dict[str, torch.Tensor], spec: BackboneSpec) -> HeadWeights:
    """head.dense → gelu → head.norm (bias-free by default) → classifier, on the first token
    (classifier_pooling "cls", the default; a "mean" model's adapter is re-labelled with pooling mean)."""
    t = _take(head, spec, "head.dense.weight", "head.norm.weight", "classifier.weight")
    d, c = t["head.dense.weight"].shape[0], t["classifier.weight"].shape[0]
    out = HeadWeights(out_w=t["classifier.weight"], out_b=head.pop("classifier.bias", torch.zeros(c)),
                      pooling="cls", hidden_w=t["head.dense.weight"],
                      hidden_b=head.pop("head.dense.bias", torch.zeros(d)), activation="gelu",
                      norm_w=t["head.norm.weight"], norm_b=head.pop("head.norm.bias", torch.zeros(d)))
    _no_more(head)
    return out


def _decoder_head(head: dict[str, torch.Tensor], spec: BackboneSpec) -> HeadWeights:
    """score (no bias) on the last real token."""
    t = _take(head, spec, "score.weight")
    _no_more(head)
    return HeadWeights(out_w=t["score.weight"], out_b=torch.zeros(t["score.weight"].shape[0]), pooling="last")


_HEADS: dict[str, Callable[[dict[str, torch.Tensor], BackboneSpec], HeadWeights]] = {
    "bert": _bert_head, "mpnet": _bert_head, "distilbert": _distilbert_head, "deberta-v2": _deberta_head,
    "modernbert": _modernbert_head, "decoder": _decoder_head,
}
