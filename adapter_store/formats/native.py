"""Switchboard's own format: one .safetensors file with the canonical tensor names and metadata.

See docs/adapter-format.md for the full description.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from server.task_adapter import AdapterValidationError, TaskAdapter
from server.tuners.head.config import HeadWeights
from server.tuners.houlsby.config import HoulsbyWeights
from server.tuners.ia3.config import IA3_SITES, Ia3Weights
from server.tuners.layer_norm.config import LayerNormWeights

FORMAT_NAME = "switchboard"
FORMAT_VERSION = "1"
FILENAME = "adapter.safetensors"


def dumps(adapter: TaskAdapter, backbone_fingerprint: str) -> bytes:
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": adapter.kind,
        "labels": json.dumps(adapter.labels),
        "pooling": adapter.head.pooling,
        "head_hidden": "true" if adapter.head.has_hidden else "false",
        "activation": adapter.houlsby.activation if adapter.houlsby else "",
        "backbone_fingerprint": backbone_fingerprint,
    }
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.tensors().items()}
    return st_save(tensors, metadata=metadata)


def _metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise AdapterValidationError("file is too short to be safetensors")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise AdapterValidationError("safetensors header length is out of range (truncated file?)")
    try:
        header = json.loads(data[8: 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AdapterValidationError("safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise AdapterValidationError("safetensors header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise AdapterValidationError("safetensors __metadata__ is not an object")
    return {str(k): str(v) for k, v in meta.items()}


def is_native(data: bytes) -> bool:
    try:
        return _metadata(data).get("format") == FORMAT_NAME
    except AdapterValidationError:
        return False


def loads(data: bytes, backbone_fingerprint: str | None = None) -> TaskAdapter:
    meta = _metadata(data)
    if meta.get("format") != FORMAT_NAME:
        raise AdapterValidationError("not a Switchboard adapter: __metadata__.format must be 'switchboard'")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterValidationError(f"unsupported format_version {meta.get('format_version')!r}")
    if backbone_fingerprint and meta.get("backbone_fingerprint") not in (None, "", backbone_fingerprint):
        raise AdapterValidationError(
            f"adapter was trained for backbone {meta.get('backbone_fingerprint')}, this server runs "
            f"{backbone_fingerprint}")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise AdapterValidationError(f"invalid safetensors file: {exc}") from exc
    try:
        labels = json.loads(meta.get("labels", "[]"))
    except json.JSONDecodeError as exc:
        raise AdapterValidationError("metadata 'labels' is not a JSON array") from exc
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise AdapterValidationError("metadata 'labels' must be a JSON array of strings")
    return from_tensors(tensors, labels, meta.get("pooling", "cls"), meta.get("activation") or "gelu")


def from_tensors(tensors: dict[str, torch.Tensor], labels: list[str], pooling: str,
                 activation: str) -> TaskAdapter:
    """Build a TaskAdapter from canonical names; unknown or missing names are refused."""
    remaining = dict(tensors)

    def take(name: str, required: bool = True) -> torch.Tensor | None:
        if name not in remaining:
            if required:
                raise AdapterValidationError(f"missing tensor {name}")
            return None
        tensor = remaining.pop(name)
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise AdapterValidationError(f"tensor {name} has dtype {tensor.dtype}; expected a float dtype")
        return tensor.float()

    head = HeadWeights(out_w=take("head.out_w"), out_b=take("head.out_b"), pooling=pooling,
                       hidden_w=take("head.hidden_w", False), hidden_b=take("head.hidden_b", False))
    vectors = {site: t for site in IA3_SITES if (t := take(f"ia3.{site}", False)) is not None}
    ia3 = Ia3Weights(vectors) if vectors else None
    houlsby = None
    if "houlsby.down_w" in remaining:
        houlsby = HoulsbyWeights(down_w=take("houlsby.down_w"), down_b=take("houlsby.down_b"),
                                 up_w=take("houlsby.up_w"), up_b=take("houlsby.up_b"), activation=activation)
    layer_norm = None
    if "layer_norm.weight" in remaining:
        layer_norm = LayerNormWeights(weight=take("layer_norm.weight"), bias=take("layer_norm.bias"))
    if remaining:
        raise AdapterValidationError(f"unknown tensor name(s): {sorted(remaining)[:5]}")
    return TaskAdapter(head=head, labels=list(labels), ia3=ia3, houlsby=houlsby, layer_norm=layer_norm)
