"""Switchboard's own format: one .safetensors file with the canonical tensor names and metadata.

Tensor names are `<kind>.<tensor>` for every registered tuner kind; each kind's string settings
(pooling, activation, …) sit in `__metadata__` beside the format, labels and backbone fingerprint.
See docs/adapter-format.md for the full description.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from switchboard.server.core.adapter import AdapterValidationError, TaskAdapter
from switchboard.server.core.tokenize import InvalidText, check_text
from switchboard.server.core.tuners import KINDS

FORMAT_NAME = "switchboard"
FORMAT_VERSION = "1"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def dumps(adapter: TaskAdapter, backbone_fingerprint: str, backbone_name: str | None = None) -> bytes:
    """backbone_name (optional metadata, for people): lets a server running another backbone name both
    models in its refusal instead of two fingerprints."""
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": adapter.kind,
        "labels": json.dumps(adapter.labels),
        "backbone_fingerprint": backbone_fingerprint,
        **({"backbone_name": backbone_name} if backbone_name else {}),
        **adapter.settings(),
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


def loads(data: bytes, backbone_fingerprint: str | None = None, backbone_name: str | None = None) -> TaskAdapter:
    """backbone_name: the server's model, named in the refusal of an adapter trained on another one."""
    meta = _metadata(data)
    if meta.get("format") != FORMAT_NAME:
        raise AdapterValidationError("not a Switchboard adapter: __metadata__.format must be 'switchboard'")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterValidationError(f"unsupported format_version {meta.get('format_version')!r}")
    if backbone_fingerprint and meta.get("backbone_fingerprint") not in (None, "", backbone_fingerprint):
        raise AdapterValidationError(backbone_mismatch(meta, backbone_fingerprint, backbone_name))
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
    try:
        check_text(labels, "labels")  # JSON's "\ud800" escape: a str nothing can encode (store, hash, answers)
    except InvalidText as exc:
        raise AdapterValidationError(f"metadata {exc}") from None
    return from_tensors(tensors, labels, meta)


EMBEDDED_BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"  # what `switchboard train` uses without --model


def backbone_mismatch(meta: dict[str, str], fingerprint: str, name: str | None) -> str:
    """Both models by name where known (files saved before `backbone_name` existed have only the
    fingerprint), and the command that trains an adapter for this server."""
    theirs = meta.get("backbone_name", "")[:200]
    adapter = f"{theirs!r} ({meta.get('backbone_fingerprint')})" if theirs else meta.get("backbone_fingerprint")
    if name == EMBEDDED_BACKBONE:
        server, retrain = f"{name!r} ({fingerprint})", "`switchboard train --data … --kind … --out …` (no --model)"
    elif name:
        server = f"{name!r} ({fingerprint})"
        retrain = f"`switchboard train --model DIR --data … --kind … --out …`, DIR holding {name}"
    else:
        server = f"{fingerprint} (GET /v1/backbone names it)"
        retrain = "`switchboard train --model DIR --data … --kind … --out …`, DIR holding the server's model"
    return (f"adapter was trained on backbone {adapter}, but this server runs {server}; an adapter works only on "
            f"the backbone it was trained on: retrain it with {retrain}")


def from_tensors(tensors: dict[str, torch.Tensor], labels: list[str], metadata: dict[str, str]) -> TaskAdapter:
    """Build a TaskAdapter from `<kind>.<tensor>` names; unknown or missing names are refused."""
    by_kind: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise AdapterValidationError(f"tensor {name} has dtype {tensor.dtype}; expected a float dtype")
        kind, _, rest = name.partition(".")
        by_kind.setdefault(kind, {})[rest] = tensor.float()
    parts = {}
    for kind in KINDS:
        own = by_kind.pop(kind.name, {})
        weights = kind.from_tensors(own, metadata)
        if own:
            by_kind[kind.name] = own  # names the kind did not take
        if weights is not None:
            parts[kind.name] = weights
    unknown = sorted(f"{kind}.{rest}" if rest else kind for kind, names in by_kind.items() for rest in names)
    if unknown:
        raise AdapterValidationError(f"unknown tensor name(s): {unknown[:5]}")
    return TaskAdapter(labels=list(labels), parts=parts)
