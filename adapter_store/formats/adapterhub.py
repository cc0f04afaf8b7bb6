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

Other families, module names read through the family's site map (core/families/):
- IA3 on module M scales M's output: the family's "out" site at M (query → q_out, the FFN output → ffn_out,
  ...). Llama/Qwen/Mistral's mlp.up_proj feeds a GLU, act(gate(x)) · up(x), so scaling its output is
  scaling down_proj's input: ffn_out_in.
- bottleneck: where the library puts it for the family (`_BOTTLENECK_MODULES`), each checked to be
  Houlsby's placement — the sublayer's output projection, before the residual (+ LayerNorm):
  DistilBERT (attention_adapters / output_adapters after out_lin / ffn.lin2, then sa_layer_norm /
  output_layer_norm of the sum), DeBERTa-v2 (BERT's modules), Llama/Mistral (after o_proj / down_proj,
  then the residual) and Qwen2/Qwen3 (the plugin interface's hooks on o_proj / mlp.down_proj).
- heads: the flexible heads of DistilBert/DebertaV2/LlamaAdapterModel (a decoder's reads the last real
  token), or a transformers model's own head (`"config": null`, as the plugin interface saves it — e.g.
  Qwen2ForSequenceClassification's `score`), read as the PEFT importer reads that family's head.
Refused: MPNet (the library has no MPNet support), ModernBERT (adapters 1.3 gives its bias-free attn.Wqkv
an unsaved random bias, so no upload says what the library computed), T5 (answer-choice tasks).
"""

from __future__ import annotations

import re

import torch

from switchboard.adapter_store.formats.module_patterns import layer_tensor_key
from switchboard.adapter_store.formats.peft import _HEADS, _bert_head
from switchboard.adapter_store.limits import UploadLimits, check_count
from switchboard.server.core.adapter import AdapterValidationError, TaskAdapter
from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.core.families import Family, family_named
from switchboard.server.core.tokenize import InvalidText, check_text
from switchboard.server.core.tuners.head.config import HeadWeights
from switchboard.server.core.tuners.houlsby.config import HoulsbyWeights, canonical_activation
from switchboard.server.core.tuners.ia3.config import Ia3Weights, site_dim

_HEAD_KEY = re.compile(r"^heads\.([^.]+)\.(\d+)\.(weight|bias)$")
# where the library inserts the bottleneck layers (mh_adapter, output_adapter) in a family's layer; each
# checked to apply to the sublayer's output projection before the residual (+ LayerNorm), as Houlsby sites 0/1
_BOTTLENECK_MODULES: dict[str, tuple[str, str]] = {
    "bert": ("attention.output", "output"),
    "deberta-v2": ("attention.output", "output"),
    "distilbert": ("attention_adapters", "output_adapters"),
    "decoder": ("attention_adapters", "output_adapters"),
}
# outputs that are not a site of their own but equal one: Llama/Qwen's up_proj output only multiplies
# act(gate_proj(x)), so scaling it scales down_proj's input
_IA3_FOLDED: dict[str, dict[str, str]] = {"decoder": {"mlp.up_proj": "ffn_out_in"}}
_REFUSED = {
    "mpnet": "the adapters library (1.3) has no MPNet support",
    "modernbert": "adapters 1.3 wraps ModernBERT's bias-free attn.Wqkv in a layer with a freshly random bias that "
                  "no file saves, so an upload cannot say what the library computed (its own reload differs)",
    "t5": "a T5 task classifies by its answer choices; convert a PEFT (IA)3 adapter with `switchboard tfew-task`",
}
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


def _family(spec: BackboneSpec) -> Family:
    if spec.family in _REFUSED:
        raise AdapterValidationError(f"AdapterHub adapters are not served on the {spec.family} family: "
                                     f"{_REFUSED[spec.family]}")
    family = family_named(spec.family)
    if family is None:
        raise AdapterValidationError(f"AdapterHub adapters are not served on the {spec.family} family")
    return family


def parse(config: dict, adapter_tensors: dict[str, torch.Tensor], spec: BackboneSpec,
          head_config: dict | None, head_tensors: dict[str, torch.Tensor] | None,
          labels: list[str] | None = None, limits: UploadLimits | None = None) -> TaskAdapter:
    limits = limits or UploadLimits()
    family = _family(spec)
    inner = _config(config)
    if head_config is None or head_tensors is None:
        raise AdapterValidationError(
            "AdapterHub upload needs its classification head: head_config.json and model_head.safetensors "
            "(save with `model.save_adapter(dir, name, with_head=True, use_safetensors=True)`)")
    for name, t in list(adapter_tensors.items()) + list(head_tensors.items()):
        if not t.is_floating_point():
            raise AdapterValidationError(f"{name}: dtype {t.dtype} is not a float dtype")
    if inner.get("architecture") == "lora":
        ia3, houlsby = _ia3(inner, adapter_tensors, spec, family), None
    elif inner.get("architecture") in (None, "bottleneck") and "reduction_factor" in inner:
        ia3, houlsby = None, _bottleneck(inner, adapter_tensors, spec, family, limits)
    else:
        raise AdapterValidationError(
            f"unsupported AdapterHub architecture {inner.get('architecture')!r}: Switchboard serves bottleneck "
            "(double_seq_bn) and IA3 adapters")
    if head_config.get("config") is None and "model_class" in head_config:
        head, head_labels = _static_head(head_config, head_tensors, spec, limits)
    else:
        head, head_labels = _head(_config(head_config), head_tensors, spec, limits)
    parts = {name: w for name, w in (("ia3", ia3), ("houlsby", houlsby), ("head", head)) if w is not None}
    return TaskAdapter(labels=list(labels or head_labels), parts=parts, metadata={"source_format": "adapterhub"})


def _bottleneck(config: dict, tensors: dict[str, torch.Tensor], spec: BackboneSpec, family: Family,
                limits: UploadLimits) -> HoulsbyWeights:
    modules = _BOTTLENECK_MODULES.get(family.name)
    if modules is None:
        raise AdapterValidationError(f"bottleneck adapters are not served on the {family.name} family (where the "
                                     "library puts them there is not Houlsby's placement, or unchecked)")
    key_re = layer_tensor_key(family.stacks, "|".join(re.escape(m) for m in modules),
                        r"adapters\.(?P<name>[^.]+)\.(?P<part>adapter_down\.0|adapter_up)\.(?P<param>weight|bias)")
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
        match = key_re.match(key)
        if not match:
            raise AdapterValidationError(f"unexpected tensor {key} in a bottleneck adapter")
        layer, site = int(match["layer"]), modules.index(match["module"])
        if not 0 <= layer < spec.num_layers:
            raise AdapterValidationError(f"{key}: layer {layer} outside the backbone's {spec.num_layers} layers")
        names.add(match["name"])
        parts[(layer, site, match["part"], match["param"])] = tensor.float()
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


def _ia3(config: dict, tensors: dict[str, torch.Tensor], spec: BackboneSpec, family: Family) -> Ia3Weights:
    if config.get("composition_mode") != "scale" or config.get("r", 1) != 1:
        raise AdapterValidationError("only IA3-style lora adapters (composition_mode 'scale', r=1) are supported")
    if config.get("use_gating") or config.get("use_dora"):
        raise AdapterValidationError("gated or DoRA lora adapters are not supported")
    alpha = float(config.get("alpha", 1))
    # the lora layer scales its module's output: the family's "out" site at that module
    sites = {ref.path: site for site, ref in family.sites.items() if ref.where == "out" and ref.part is None}
    sites.update(_IA3_FOLDED.get(family.name, {}))
    key_re = layer_tensor_key(family.stacks, r"[A-Za-z_0-9.]+", r"loras\.(?P<name>[^.]+)\.lora_B")
    vectors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[str, int], str] = {}
    for key, tensor in tensors.items():
        match = key_re.match(key)
        if not match:
            raise AdapterValidationError(f"unexpected tensor {key} in an IA3 adapter")
        layer, module = int(match["layer"]), match["module"]
        site = sites.get(module)
        if site is None or site not in spec.sites:
            raise AdapterValidationError(
                f"{key}: IA3 on {module} is not a site Switchboard supports on the {family.name} family")
        if (site, layer) in seen:
            raise AdapterValidationError(f"{key} and {seen[site, layer]} both scale layer {layer}'s {site}")
        seen[site, layer] = key
        layers = spec.site_layers(site)
        if not 0 <= layer < layers:
            raise AdapterValidationError(f"{key}: layer {layer} outside the backbone's {layers} layers")
        dim = site_dim(site, spec)
        if tuple(tensor.shape) != (dim, 1):
            raise AdapterValidationError(f"{key}: shape {tuple(tensor.shape)}, expected {(dim, 1)}")
        vectors.setdefault(site, torch.ones(layers, dim))[layer] = tensor.reshape(-1).float() * alpha
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
    labels = _labels(config, num_labels, limits)
    # the library's decoder models (LlamaAdapterModel, ...) pool the last non-pad token, as our "last" does
    pooling = "pooler" if config.get("use_pooler") else "last" if spec.pooling == "last" else "cls"
    return HeadWeights(out_w=out["weight"], out_b=out["bias"], pooling=pooling,
                       hidden_w=hidden["weight"] if hidden else None,
                       hidden_b=hidden["bias"] if hidden else None), labels


def _static_head(config: dict, tensors: dict[str, torch.Tensor], spec: BackboneSpec,
                 limits: UploadLimits) -> tuple[HeadWeights, list[str]]:
    """A transformers *ForSequenceClassification model's own head (the plugin interface's models have no
    flexible heads): saved under the model's module names, read as the PEFT importer reads the family's."""
    model_class = config.get("model_class")
    if not isinstance(model_class, str) or not model_class.endswith("ForSequenceClassification"):
        raise AdapterValidationError(f"unsupported head of model class {model_class!r}: a *ForSequenceClassification "
                                     "model's head or a flexible classification head is served")
    try:
        head = _HEADS.get(spec.family, _bert_head)({k: t.float() for k, t in tensors.items()}, spec)
    except AdapterValidationError as exc:
        raise AdapterValidationError(f"model_head.safetensors ({model_class}): {exc}") from None
    num_labels = config.get("num_labels", head.num_labels)
    if not isinstance(num_labels, int) or num_labels != head.num_labels:
        raise AdapterValidationError(f"head has {head.num_labels} outputs but num_labels={num_labels!r}")
    return head, _labels(config, num_labels, limits)


def _labels(config: dict, num_labels: int, limits: UploadLimits) -> list[str]:
    check_count(num_labels, limits, "head_config.json")
    label2id = config.get("label2id") or {}
    labels = [f"LABEL_{i}" for i in range(num_labels)]
    if isinstance(label2id, dict) and sorted(label2id.values()) == list(range(num_labels)):
        labels = [name for name, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
    try:
        check_text(labels, "labels")  # label2id's keys: JSON's "\ud800" escape makes a str nothing can encode
    except InvalidText as exc:
        raise AdapterValidationError(f"head_config.json label2id: {exc}") from None
    return labels
