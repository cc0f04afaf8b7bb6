"""AdapterHub (`adapters`) directories: adapter_config.json + adapter.safetensors, optional
head_config.json + model_head.safetensors. Bottleneck (Houlsby `double_seq_bn`) and
IA3 adapters with a classification head. The pickle names are refused upstream. (Pfeiffer `seq_bn`
uses original_ln_before=True, which the engine cannot express: refused.)

What the library computes (adapters 1.3, read from its source and checked against committed fixtures):
- bottleneck: h = dropout(dense(x)); out = LayerNorm(h + scaling·up(act(down(h))) + input), at
  `attention.output` (mh_adapter) and `output` (output_adapter) — our Houlsby sites 0 and 1;
- IA3 ("lora" architecture, composition "scale"): key / value / intermediate.dense outputs (bias
  included, before the activation) times alpha·lora_B — our k_out, v_out, ffn_int_out;
- classification head: first token → [Dropout, Linear(d,d), act, Dropout, Linear(d,C)] (layers=2).
"""

from __future__ import annotations

import re

import torch

from switchboard.adapter_store.limits import UploadLimits, check_count
from switchboard.server.core.adapter import AdapterValidationError, TaskAdapter
from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.core.tokenize import InvalidText, check_text
from switchboard.server.core.tuners.head.config import HeadWeights
from switchboard.server.core.tuners.houlsby.config import HoulsbyWeights, canonical_activation
from switchboard.server.core.tuners.ia3.config import Ia3Weights, site_dim

_BOTTLENECK_KEY = re.compile(
    r"^(?:[A-Za-z_]+\.)?encoder\.layer\.(\d+)\.(attention\.output|output)\.adapters\.([^.]+)\."
    r"(adapter_down\.0|adapter_up)\.(weight|bias)$")
_IA3_KEY = re.compile(
    r"^(?:[A-Za-z_]+\.)?encoder\.layer\.(\d+)\.(attention\.self\.query|attention\.self\.key|attention\.self\.value|"
    r"intermediate\.dense|output\.dense)\.loras\.([^.]+)\.lora_B$")
_HEAD_KEY = re.compile(r"^heads\.([^.]+)\.(\d+)\.(weight|bias)$")
_IA3_SITES = {"attention.self.key": "k_out", "attention.self.value": "v_out", "intermediate.dense": "ffn_int_out"}
# bottleneck options with the only values whose computation the engine reproduces
_BOTTLENECK_REQUIRED = {"original_ln_before": False, "original_ln_after": True, "residual_before_ln": True,
                        "ln_before": False, "ln_after": False, "is_parallel": False, "use_gating": False,
                        "phm_layer": False, "adapter_residual_before_ln": False}


def _config(raw: dict) -> dict:
    config = raw.get("config", raw)
    if not isinstance(config, dict):
        raise AdapterValidationError("adapter_config.json: 'config' must be an object")
    return config


def is_adapterhub(config: dict) -> bool:
    inner = config.get("config")
    return isinstance(inner, dict) and ("reduction_factor" in inner
                                        or inner.get("architecture") in ("lora", "prefix_tuning"))


def parse(config: dict, adapter_tensors: dict[str, torch.Tensor], spec: BackboneSpec,
          head_config: dict | None, head_tensors: dict[str, torch.Tensor] | None,
          labels: list[str] | None = None, limits: UploadLimits | None = None) -> TaskAdapter:
    limits = limits or UploadLimits()
    inner = _config(config)
    if head_config is None or head_tensors is None:
        raise AdapterValidationError(
            "AdapterHub upload needs its classification head: head_config.json and model_head.safetensors "
            "(save with `model.save_adapter(dir, name, with_head=True, use_safetensors=True)`)")
    for name, t in list(adapter_tensors.items()) + list(head_tensors.items()):
        if not t.is_floating_point():
            raise AdapterValidationError(f"{name}: dtype {t.dtype} is not a float dtype")
    if inner.get("architecture") == "lora":
        ia3, houlsby = _ia3(inner, adapter_tensors, spec), None
    elif inner.get("architecture") in (None, "bottleneck") and "reduction_factor" in inner:
        ia3, houlsby = None, _bottleneck(inner, adapter_tensors, spec, limits)
    else:
        raise AdapterValidationError(
            f"unsupported AdapterHub architecture {inner.get('architecture')!r}: Switchboard serves bottleneck "
            "(double_seq_bn) and IA3 adapters")
    head, head_labels = _head(_config(head_config), head_tensors, spec, limits)
    parts = {name: w for name, w in (("ia3", ia3), ("houlsby", houlsby), ("head", head)) if w is not None}
    return TaskAdapter(labels=list(labels or head_labels), parts=parts, metadata={"source_format": "adapterhub"})


def _bottleneck(config: dict, tensors: dict[str, torch.Tensor], spec: BackboneSpec,
                limits: UploadLimits) -> HoulsbyWeights:
    for option, value in _BOTTLENECK_REQUIRED.items():
        if option not in config and option in ("original_ln_before", "original_ln_after", "residual_before_ln"):
            raise AdapterValidationError(f"bottleneck config lacks {option}; cannot tell where the adapter sits")
        if option in config and bool(config[option]) != value:
            raise AdapterValidationError(f"bottleneck option {option}={config[option]!r} is not supported "
                                         f"(Switchboard runs Houlsby/Pfeiffer placement: {option}={value})")
    activation = canonical_activation(str(config.get("non_linearity", "relu")))
    scaling = config.get("scaling", 1.0)
    if not isinstance(scaling, (int, float)):
        raise AdapterValidationError(f"bottleneck scaling {scaling!r} is not supported (a number is)")
    parts: dict[tuple[int, int, str, str], torch.Tensor] = {}
    names = set()
    for key, tensor in tensors.items():
        match = _BOTTLENECK_KEY.match(key)
        if not match:
            raise AdapterValidationError(f"unexpected tensor {key} in a bottleneck adapter")
        layer, site = int(match.group(1)), 0 if match.group(2) == "attention.output" else 1
        if not 0 <= layer < spec.num_layers:
            raise AdapterValidationError(f"{key}: layer {layer} outside the backbone's {spec.num_layers} layers")
        names.add(match.group(3))
        parts[(layer, site, match.group(4), match.group(5))] = tensor.float()
    if len(names) != 1:
        raise AdapterValidationError(f"expected one adapter in the file, found {sorted(names) or 'none'}")
    d, L = spec.hidden_size, spec.num_layers
    sites = {(layer, site) for layer, site, _, _ in parts}
    widths = {}
    for layer, site in sites:
        try:
            dw, db = parts[(layer, site, "adapter_down.0", "weight")], parts[(layer, site, "adapter_down.0", "bias")]
            uw, ub = parts[(layer, site, "adapter_up", "weight")], parts[(layer, site, "adapter_up", "bias")]
        except KeyError as exc:
            raise AdapterValidationError(f"layer {layer}: incomplete bottleneck adapter (missing {exc})") from exc
        m = dw.shape[0] if dw.dim() == 2 else -1
        if dw.shape != (m, d) or db.shape != (m,) or uw.shape != (d, m) or ub.shape != (d,) or m < 1:
            raise AdapterValidationError(f"layer {layer}: bottleneck shapes {tuple(dw.shape)}/{tuple(uw.shape)} do "
                                         f"not fit hidden size {d}")
        widths[(layer, site)] = m
    width = max(widths.values())
    padded = L * 2 * (2 * d * width + width + d) * 4  # float32 bytes after zero-padding every layer
    if padded > limits.max_task_bytes:
        raise AdapterValidationError(
            f"a bottleneck of width {width} pads to {padded} bytes for {L} layers, over the "
            f"{limits.max_task_bytes}-byte limit for one task (the widest layer sets the width of every layer)")
    # Layers may differ in width (reduction_factor mapping) or be left out: zero-pad to the widest.
    # Every supported activation maps 0 to 0, so padded units contribute exactly nothing.
    down_w, down_b = torch.zeros(L, 2, width, d), torch.zeros(L, 2, width)
    up_w, up_b = torch.zeros(L, 2, d, width), torch.zeros(L, 2, d)
    for (layer, site), m in widths.items():
        down_w[layer, site, :m] = parts[(layer, site, "adapter_down.0", "weight")]
        down_b[layer, site, :m] = parts[(layer, site, "adapter_down.0", "bias")]
        up_w[layer, site, :, :m] = parts[(layer, site, "adapter_up", "weight")] * scaling
        up_b[layer, site] = parts[(layer, site, "adapter_up", "bias")] * scaling
    return HoulsbyWeights(down_w=down_w, down_b=down_b, up_w=up_w, up_b=up_b, activation=activation)


def _ia3(config: dict, tensors: dict[str, torch.Tensor], spec: BackboneSpec) -> Ia3Weights:
    if config.get("composition_mode") != "scale" or config.get("r", 1) != 1:
        raise AdapterValidationError("only IA3-style lora adapters (composition_mode 'scale', r=1) are supported")
    if config.get("use_gating") or config.get("use_dora"):
        raise AdapterValidationError("gated or DoRA lora adapters are not supported")
    alpha = float(config.get("alpha", 1))
    vectors: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _IA3_KEY.match(key)
        if not match:
            raise AdapterValidationError(f"unexpected tensor {key} in an IA3 adapter")
        layer, module = int(match.group(1)), match.group(2)
        site = _IA3_SITES.get(module)
        if site is None:
            raise AdapterValidationError(f"{key}: IA3 on {module} is not a site Switchboard supports")
        if not 0 <= layer < spec.num_layers:
            raise AdapterValidationError(f"{key}: layer {layer} outside the backbone's {spec.num_layers} layers")
        dim = site_dim(site, spec)
        if tuple(tensor.shape) != (dim, 1):
            raise AdapterValidationError(f"{key}: shape {tuple(tensor.shape)}, expected {(dim, 1)}")
        vectors.setdefault(site, torch.ones(spec.num_layers, dim))[layer] = tensor.reshape(-1).float() * alpha
    if not vectors:
        raise AdapterValidationError("the IA3 adapter holds no lora_B vectors")
    return Ia3Weights(vectors)


def _head(config: dict, tensors: dict[str, torch.Tensor], spec: BackboneSpec,
          limits: UploadLimits) -> tuple[HeadWeights, list[str]]:
    if config.get("head_type") != "classification":
        raise AdapterValidationError(f"unsupported head_type {config.get('head_type')!r}; use a classification head")
    layers = config.get("layers", 2)
    if layers not in (1, 2):
        raise AdapterValidationError(f"classification heads with {layers} layers are not supported (1 or 2)")
    if layers == 2 and config.get("activation_function", "tanh") != "tanh":
        raise AdapterValidationError("only tanh is supported as the head's hidden activation")
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _HEAD_KEY.match(key)
        if not match:
            raise AdapterValidationError(f"unexpected tensor {key} in model_head.safetensors")
        by_index.setdefault(int(match.group(2)), {})[match.group(3)] = tensor.float()
    linears = sorted(by_index)
    if len(linears) != layers or any(set(by_index[i]) != {"weight", "bias"} for i in linears):
        raise AdapterValidationError(f"head tensors {sorted(tensors)} do not form a {layers}-layer head with biases")
    out = by_index[linears[-1]]
    hidden = by_index[linears[0]] if layers == 2 else None
    num_labels = config.get("num_labels", out["weight"].shape[0])
    if not isinstance(num_labels, int) or num_labels != out["weight"].shape[0]:
        raise AdapterValidationError(f"head has {out['weight'].shape[0]} outputs but num_labels={num_labels!r}")
    check_count(num_labels, limits, "head_config.json")
    label2id = config.get("label2id") or {}
    labels = [f"LABEL_{i}" for i in range(num_labels)]
    if isinstance(label2id, dict) and sorted(label2id.values()) == list(range(num_labels)):
        labels = [name for name, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
    try:
        check_text(labels, "labels")  # label2id's keys: JSON's "\ud800" escape makes a str nothing can encode
    except InvalidText as exc:
        raise AdapterValidationError(f"head_config.json label2id: {exc}") from None
    pooling = "pooler" if config.get("use_pooler") else "cls"
    return HeadWeights(out_w=out["weight"], out_b=out["bias"], pooling=pooling,
                       hidden_w=hidden["weight"] if hidden else None,
                       hidden_b=hidden["bias"] if hidden else None), labels
