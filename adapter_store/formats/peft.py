"""PEFT (IA)3 adapters: adapter_config.json + adapter_model.safetensors.

Feed-forward modules scale their input, others their output (PEFT's IA3Layer). With a
*ForSequenceClassification model the head is saved as `base_model.model.classifier.*`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from switchboard.server.core.adapter import AdapterValidationError, TaskAdapter
from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.core.tuners.head.config import HeadWeights
from switchboard.server.core.tuners.ia3.config import Ia3Weights, site_dim

_LAYER_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:[A-Za-z_]+\.)?encoder\.layer\.(\d+)\.([A-Za-z_.]+)\.ia3_l$")
_HEAD_PREFIX = re.compile(r"^(?:base_model\.model\.)?")

# (module path, is_feedforward) → our site
_SITES: dict[tuple[str, bool], str] = {
    ("attention.self.key", False): "k_out",
    ("attention.self.value", False): "v_out",
    ("attention.output.dense", True): "attn_out_in",
    ("intermediate.dense", False): "ffn_int_out",
    ("output.dense", True): "ffn_out_in",
}


def _is_feedforward(module_key: str, feedforward_modules: str | Iterable[str] | None) -> bool:
    """PEFT's own rule: a string is a full-match regex, a list matches by suffix."""
    if not feedforward_modules:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module_key) is not None
    return any(module_key.endswith(target) for target in feedforward_modules)


def parse(config: dict, tensors: dict[str, torch.Tensor], spec: BackboneSpec,
          labels: list[str] | None = None) -> TaskAdapter:
    if config.get("peft_type") != "IA3":
        raise AdapterValidationError(
            f"unsupported PEFT adapter type {config.get('peft_type')!r}: Switchboard serves PEFT IA3 adapters")
    ff_modules = config.get("feedforward_modules")
    if ff_modules is not None and not isinstance(ff_modules, str) and not (
            isinstance(ff_modules, list) and all(isinstance(m, str) for m in ff_modules)):
        raise AdapterValidationError("feedforward_modules must be a string or a list of strings")
    if isinstance(ff_modules, str):
        try:
            re.compile(ff_modules)
        except re.error as exc:
            raise AdapterValidationError(f"feedforward_modules is not a valid regex: {exc}") from exc
    vectors: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _LAYER_KEY.match(key)
        if match:
            layer, module = int(match.group(1)), match.group(2)
            module_key = f"encoder.layer.{layer}.{module}"
            site = _SITES.get((module, _is_feedforward(module_key, ff_modules)))
            if site is None:
                raise AdapterValidationError(
                    f"{key}: (IA)3 on {module} ({'input' if _is_feedforward(module_key, ff_modules) else 'output'}"
                    " scaling) is not a site Switchboard supports")
            if not 0 <= layer < spec.num_layers:
                raise AdapterValidationError(f"{key}: layer {layer} outside the backbone's {spec.num_layers} layers")
            dim = site_dim(site, spec)
            if not tensor.is_floating_point():
                raise AdapterValidationError(f"{key}: dtype {tensor.dtype} is not a float dtype")
            if tensor.numel() != dim or tensor.dim() != 2 or 1 not in tensor.shape:
                raise AdapterValidationError(f"{key}: shape {tuple(tensor.shape)} does not fit dimension {dim}")
            vec = vectors.setdefault(site, torch.ones(spec.num_layers, dim))
            vec[layer] = tensor.reshape(-1).float()
            continue
        name = _HEAD_PREFIX.sub("", key)
        if name.startswith("classifier."):
            head[name.removeprefix("classifier.")] = tensor.float()
            continue
        raise AdapterValidationError(f"unexpected tensor {key} in a PEFT IA3 adapter")
    if not vectors:
        raise AdapterValidationError("the PEFT adapter holds no ia3_l vectors")
    head_weights = _head(head)
    names = labels or [f"LABEL_{i}" for i in range(head_weights.num_labels)]
    return TaskAdapter(labels=list(names), parts={"ia3": Ia3Weights(vectors), "head": head_weights},
                       metadata={"source_format": "peft"})


def _head(head: dict[str, torch.Tensor]) -> HeadWeights:
    """BERT: classifier.{weight,bias} on the pooler. RoBERTa: classifier.dense + out_proj on <s>."""
    if set(head) == {"weight", "bias"}:
        return HeadWeights(out_w=head["weight"], out_b=head["bias"], pooling="pooler")
    if set(head) == {"dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"}:
        return HeadWeights(out_w=head["out_proj.weight"], out_b=head["out_proj.bias"], pooling="cls",
                           hidden_w=head["dense.weight"], hidden_b=head["dense.bias"])
    if not head:
        raise AdapterValidationError(
            "the PEFT adapter has no classification head: save it from a *ForSequenceClassification model "
            "(task_type SEQ_CLS) so that modules_to_save includes the classifier")
    raise AdapterValidationError(f"unrecognised classifier tensors {sorted(head)}")
