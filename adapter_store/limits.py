"""Bounds on everything an upload can make the server parse or allocate, checked before the work.

A file's own size bounds its tensors (safetensors checks offsets against the buffer), but not its
header, its JSON, its label names, or what a format expands into (AdapterHub's per-layer widths are
zero-padded to the widest). Each of those is checked here, against the server's settings, before the
parser allocates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import BinaryIO

from switchboard.server.core.adapter import AdapterValidationError

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class UploadLimits:
    max_labels: int = 1024
    max_label_length: int = 128  # characters per label name
    max_task_bytes: int = 1 << 30  # resident parameter bytes of one task, after any expansion
    max_files: int = 8
    max_json_bytes: int = 64 << 10  # adapter_config.json, head_config.json
    max_header_bytes: int = 1 << 20  # a safetensors file's JSON header
    max_tensors: int = 4096
    max_tensor_name: int = 256


def check_labels(labels: list[str], limits: UploadLimits, where: str = "labels") -> list[str]:
    """Count, type, emptiness, length and uniqueness of label names."""
    if len(labels) > limits.max_labels:
        raise AdapterValidationError(f"{where}: {len(labels)} labels; at most {limits.max_labels}")
    for label in labels:
        if not isinstance(label, str) or not label:
            raise AdapterValidationError(f"{where}: every label must be a non-empty string")
        if len(label) > limits.max_label_length:
            raise AdapterValidationError(f"{where}: a label of {len(label)} characters; at most "
                                         f"{limits.max_label_length}")
    if len(set(labels)) != len(labels):
        raise AdapterValidationError(f"{where}: label names must be unique")
    return labels


def check_count(n: int, limits: UploadLimits, where: str) -> int:
    """A label count read from a file, checked before anything of that size is built."""
    if not 1 <= n <= limits.max_labels:
        raise AdapterValidationError(f"{where}: {n} labels; between 1 and {limits.max_labels}")
    return n


def check_json_size(name: str, data: bytes, limits: UploadLimits) -> None:
    if len(data) > limits.max_json_bytes:
        raise AdapterValidationError(f"{name}: {len(data)} bytes; a config file may have at most "
                                     f"{limits.max_json_bytes}")


def check_safetensors_header(name: str, data: bytes, limits: UploadLimits) -> None:
    """Header length, tensor count, name length, dtypes and size as float32, read before safetensors allocates."""
    if len(data) < 8:
        raise AdapterValidationError(f"{name}: too short to be safetensors")
    check_safetensors_head(name, data[:8], data[8: 8 + _header_length(name, data[:8], len(data), limits)], limits)


def _header_length(name: str, prefix: bytes, file_size: int, limits: UploadLimits) -> int:
    header_len = int.from_bytes(prefix[:8], "little")
    if header_len > limits.max_header_bytes:
        raise AdapterValidationError(f"{name}: safetensors header of {header_len} bytes; at most "
                                     f"{limits.max_header_bytes}")
    if header_len <= 0 or 8 + header_len > file_size:
        raise AdapterValidationError(f"{name}: safetensors header length is out of range (truncated file?)")
    return header_len


def check_safetensors_head(name: str, prefix: bytes, header_bytes: bytes, limits: UploadLimits) -> None:
    """The checks of a safetensors header given its first bytes only (the tensors need not be read yet):
    what the tensors will take as float32 (every format is converted to it) is bounded by max_task_bytes
    before anything of that size is read or allocated."""
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AdapterValidationError(f"{name}: safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise AdapterValidationError(f"{name}: safetensors header is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(tensors) > limits.max_tensors:
        raise AdapterValidationError(f"{name}: {len(tensors)} tensors; at most {limits.max_tensors}")
    elements = 0
    for key, info in tensors.items():
        if len(key) > limits.max_tensor_name:
            raise AdapterValidationError(f"{name}: a tensor name of {len(key)} characters; at most "
                                         f"{limits.max_tensor_name}")
        if not isinstance(info, dict) or info.get("dtype") not in FLOAT_DTYPES:
            dtype = info.get("dtype") if isinstance(info, dict) else None
            raise AdapterValidationError(f"{name}: tensor {key[:80]} has dtype {dtype!r}; expected a float dtype")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d < 1 << 40 for d in shape):
            raise AdapterValidationError(f"{name}: tensor {key[:80]} has an invalid shape")
        elements += math.prod(shape)
    if elements * 4 > limits.max_task_bytes:
        raise AdapterValidationError(f"{name}: its tensors hold {elements} parameters, {elements * 4} bytes as "
                                     f"float32; one task may hold at most {limits.max_task_bytes} (max_task_bytes)")


def read_upload_file(name: str, file: BinaryIO, limits: UploadLimits) -> bytes:
    """One uploaded file's bytes, read from its spooled copy only after what its first bytes promise is
    checked: a safetensors header (size, dtypes, float32 size) before its tensors, a config file's size
    before its content. Other files are read only as far as the parser needs to refuse them."""
    file.seek(0, 2)
    size = file.tell()
    file.seek(0)
    if name.endswith(".safetensors"):
        if size < 8:
            raise AdapterValidationError(f"{name}: too short to be safetensors")
        prefix = file.read(8)
        header_len = _header_length(name, prefix, size, limits)
        check_safetensors_head(name, prefix, file.read(header_len), limits)
        file.seek(0)
        return file.read()
    if name.endswith(".json"):
        if size > limits.max_json_bytes:
            raise AdapterValidationError(f"{name}: {size} bytes; a config file may have at most "
                                         f"{limits.max_json_bytes}")
        return file.read()
    return file.read(min(size, limits.max_json_bytes))
