"""Turn the files of one upload into a validated TaskAdapter. Safetensors only; never unpickles.

Every size is checked before the work it bounds (limits.py): file count and names, JSON config sizes,
safetensors headers, label names, and what a format expands into.
"""

from __future__ import annotations

import json
import re

from safetensors.torch import load as st_load

from switchboard.adapter_store.formats import adapterhub, native, peft
from switchboard.adapter_store.limits import (
    UploadLimits,
    check_json_size,
    check_labels,
    check_safetensors_header,
)
from switchboard.server.core.adapter import AdapterValidationError, TaskAdapter
from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.core.tokenize import InvalidText, check_text

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _safetensors(name: str, data: bytes, limits: UploadLimits) -> dict:
    check_safetensors_header(name, data, limits)
    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise AdapterValidationError(f"{name}: not a valid safetensors file ({exc})") from exc


def _json(name: str, data: bytes, limits: UploadLimits) -> dict:
    check_json_size(name, data, limits)
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AdapterValidationError(f"{name}: not valid JSON") from exc
    if not isinstance(value, dict):
        raise AdapterValidationError(f"{name}: expected a JSON object")
    return value


def parse_upload(files: dict[str, bytes], spec: BackboneSpec, labels: list[str] | None = None,
                 limits: UploadLimits | None = None) -> TaskAdapter:
    """files: plain file name → content. Raises AdapterValidationError naming the first problem."""
    limits = limits or UploadLimits()
    try:
        adapter = _parse(files, spec, labels, limits)
    except (AdapterValidationError, InvalidText):  # InvalidText: the client's `labels` field, a 422 of its own
        raise
    except (ValueError, TypeError, IndexError, KeyError, RecursionError, OverflowError) as exc:
        # A malformed file that slipped past the explicit checks is still the client's error, not ours.
        raise AdapterValidationError(f"malformed adapter: {type(exc).__name__}: {exc}") from exc
    if adapter.kind not in ("ia3", "houlsby", "mixed"):
        raise AdapterValidationError("the adapter holds neither (IA)3 vectors nor Houlsby adapters")
    return adapter


def _parse(files: dict[str, bytes], spec: BackboneSpec, labels: list[str] | None,
           limits: UploadLimits) -> TaskAdapter:
    if not files:
        raise AdapterValidationError("no files uploaded")
    if len(files) > limits.max_files:
        raise AdapterValidationError(f"{len(files)} files; an adapter has at most {limits.max_files}")
    for name, data in files.items():
        if not _SAFE_NAME.match(name) or ".." in name:
            raise AdapterValidationError(f"file name {name[:80]!r} is not a plain file name")
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise AdapterValidationError(
                f"{name}: pickle files are never loaded by the server; convert them to safetensors on your "
                f"side with `switchboard convert DIR`")
        if not data:
            raise AdapterValidationError(f"{name}: empty file")
    if labels is not None:
        check_labels(labels, limits)
        check_text(labels, "labels")  # the form field: InvalidText, a 422 validation_error naming labels[i]
    if "adapter_config.json" in files:
        config = _json("adapter_config.json", files["adapter_config.json"], limits)
        if "peft_type" in config:
            if "adapter_model.safetensors" not in files:
                raise AdapterValidationError("a PEFT adapter needs adapter_model.safetensors")
            adapter = peft.parse(config, _safetensors("adapter_model.safetensors", files["adapter_model.safetensors"],
                                                      limits), spec, labels, limits)
        elif adapterhub.is_adapterhub(config):
            if "adapter.safetensors" not in files:
                raise AdapterValidationError("an AdapterHub adapter needs adapter.safetensors")
            head_config = (_json("head_config.json", files["head_config.json"], limits)
                           if "head_config.json" in files else None)
            head_tensors = (_safetensors("model_head.safetensors", files["model_head.safetensors"], limits)
                            if "model_head.safetensors" in files else None)
            tensors = _safetensors("adapter.safetensors", files["adapter.safetensors"], limits)
            adapter = adapterhub.parse(config, tensors, spec, head_config, head_tensors, labels, limits)
        else:
            raise AdapterValidationError(
                "adapter_config.json is neither a PEFT config (peft_type) nor an AdapterHub config")
    else:
        weights = [n for n in files if n.endswith(".safetensors")]
        if len(weights) != 1:
            raise AdapterValidationError(
                "upload one native .safetensors file, or a PEFT directory (adapter_config.json + "
                "adapter_model.safetensors)")
        check_safetensors_header(weights[0], files[weights[0]], limits)
        adapter = native.loads(files[weights[0]], spec.fingerprint, backbone_name=spec.name)
    if spec.family == "t5" and "choices" not in adapter.parts:
        raise AdapterValidationError(
            "a T5 task classifies by its answer choices: convert the adapter with `switchboard tfew-task "
            "--choices ... [--template ...]` (docs/backbones.md), which stores them with it")
    if labels is not None:
        if len(labels) != adapter.num_labels:
            raise AdapterValidationError(f"{len(labels)} labels given for a head with {adapter.num_labels} outputs")
        adapter.labels = list(labels)
    check_labels(adapter.labels, limits)
    _check_file_labels(adapter.labels)
    if adapter.nbytes > limits.max_task_bytes:
        raise AdapterValidationError(f"the adapter holds {adapter.nbytes} parameter bytes; one task may hold at most "
                                     f"{limits.max_task_bytes}")
    adapter.validate(spec)
    return adapter


def _check_file_labels(labels: list[str]) -> None:
    """Label names read from the files (whatever the format) must be valid Unicode: a lone surrogate could
    be neither hashed, stored nor sent back. (The formats check their own sources; this catches any.)"""
    try:
        check_text(labels, "labels")
    except InvalidText as exc:
        raise AdapterValidationError(f"the adapter's {exc}") from None
