"""PEFT (IA)3 adapters: adapter_config.json + adapter_model.safetensors.

Feed-forward modules scale their input, others their output (PEFT's IA3Layer). With a
*ForSequenceClassification model the head is saved as `base_model.model.classifier.*`.
"""

from __future__ import annotations

import re

import torch

from switchboard.adapter_store.formats.module_patterns import module_matcher
from switchboard.adapter_store.limits import UploadLimits, check_count
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


def parse(config: dict, tensors: dict[str, torch.Tensor], spec: BackboneSpec,
          labels: list[str] | None = None, limits: UploadLimits | None = None) -> TaskAdapter:
    limits = limits or UploadLimits()
    if config.get("peft_type") != "IA3":
        raise AdapterValidationError(
            f"unsupported PEFT adapter type {config.get('peft_type')!r}: Switchboard serves PEFT IA3 adapters")
    is_feedforward = module_matcher(config.get("feedforward_modules"), "feedforward_modules")
    seen: dict[tuple[str, int], str] = {}
    vectors: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _LAYER_KEY.match(key)
        if match:
            layer, module = int(match.group(1)), match.group(2)
            feedforward = is_feedforward(f"encoder.layer.{layer}.{module}")
            site = _SITES.get((module, feedforward))
            if site is None:
                raise AdapterValidationError(
                    f"{key}: (IA)3 on {module} ({'input' if feedforward else 'output'} scaling) is not a site "
                    "Switchboard supports")
            if (site, layer) in seen:
                raise AdapterValidationError(f"{key} and {seen[site, layer]} both scale layer {layer}'s {site}")
            seen[site, layer] = key
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
    names = labels or [f"LABEL_{i}" for i in range(check_count(head_weights.num_labels, limits, "classifier"))]
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
