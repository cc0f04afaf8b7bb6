"""One task's trained parameters in the engine's canonical layout, whatever format they came from.

A task is a set of parts, one per registered tuner kind it uses (always a head), plus label names.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.core.tuners import KINDS, KINDS_BY_NAME, READOUTS, AdapterValidationError, readout_name

__all__ = ["MAX_ABS_WEIGHT", "AdapterValidationError", "TaskAdapter"]

# No trained adapter holds a parameter this large: Adam moves a weight by about lr per step, so even the
# server's own largest job (max_train_steps 2000 at lr ≤ 1) stays within ±2001 of its start, and
# converted PEFT/AdapterHub adapters hold values of order 1–10. A larger value is a hostile or broken
# file whose products overflow (3e38 in an (IA)3 vector made every score NaN): refused at upload, 422.
MAX_ABS_WEIGHT = 1e4


@dataclass
class TaskAdapter:
    labels: list[str]
    parts: dict[str, Any]  # tuner kind name → that kind's weights; the readout (head) is required
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def head(self) -> Any:
        """The readout: the classification head, or a T5 task's answer choices."""
        return self.parts[readout_name(self.parts)]

    @property
    def kind(self) -> str:
        """"ia3", "houlsby", "mixed" (more than one adapter kind) or "head" (no adapter at all)."""
        adapters = [k.name for k in KINDS if k.is_adapter and k.name in self.parts]
        if len(adapters) > 1:
            return "mixed"
        return adapters[0] if adapters else "head"

    @property
    def num_labels(self) -> int:
        return self.head.num_labels

    def without(self, *names: str) -> TaskAdapter:
        """The same task minus some parts (tests build identity and head-only tasks this way)."""
        return TaskAdapter(list(self.labels), {k: v for k, v in self.parts.items() if k not in names},
                           dict(self.metadata))

    def items(self) -> list[tuple[Any, Any]]:
        """(kind, weights) in registration order."""
        return [(kind, self.parts[kind.name]) for kind in KINDS if kind.name in self.parts]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat `<kind>.<tensor>` → tensor map: the native file's content and the basis of the content hash."""
        return {f"{kind.name}.{name}": t for kind, w in self.items() for name, t in kind.tensors(w).items()}

    def settings(self) -> dict[str, str]:
        """Every kind's string settings (pooling, activation, …), as stored in the native file."""
        out: dict[str, str] = {}
        for kind, w in self.items():
            out |= kind.metadata(w)
        return out

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def content_hash(self) -> str:
        """sha256 over tensors, labels and the settings that change the output."""
        digest = hashlib.sha256()
        # "surrogatepass": a string no validation refused (a lone surrogate) still hashes, never raises;
        # for every valid string it is plain UTF-8, so existing hashes are unchanged.
        digest.update(";".join(f"{k}={v}" for k, v in sorted(self.settings().items())).encode("utf-8", "surrogatepass"))
        digest.update(b"\x1e" + "\x1f".join(self.labels).encode("utf-8", "surrogatepass"))
        for name, tensor in sorted(self.tensors().items()):
            data = tensor.detach().to("cpu", torch.float32).contiguous()
            digest.update(name.encode("utf-8", "surrogatepass"))
            digest.update(str(tuple(data.shape)).encode())
            digest.update(data.numpy().tobytes())
        return digest.hexdigest()

    def validate(self, spec: BackboneSpec) -> None:
        """Check every part, tensor shape and value against the backbone before anything is loaded."""
        unknown = set(self.parts) - set(KINDS_BY_NAME)
        if unknown:
            raise AdapterValidationError(f"unknown module kind(s) {sorted(unknown)}")
        readouts = [name for name in READOUTS if name in self.parts]
        if len(readouts) != 1:
            raise AdapterValidationError(
                "the task has no head" if not readouts else f"the task has {len(readouts)} readouts {readouts}; one")
        for kind, w in self.items():
            kind.validate(w, spec)
        if len(self.labels) != self.num_labels:
            raise AdapterValidationError(f"{len(self.labels)} label names for a head with {self.num_labels} rows")
        if len(set(self.labels)) != len(self.labels):
            raise AdapterValidationError("label names must be unique")
        for kind, w in self.items():
            expected = kind.expected_shapes(w, spec)
            for name, tensor in kind.tensors(w).items():
                full = f"{kind.name}.{name}"
                if tuple(tensor.shape) != expected[name]:
                    raise AdapterValidationError(
                        f"tensor {full} has shape {tuple(tensor.shape)}, expected {expected[name]} for this backbone")
                if not tensor.is_floating_point():
                    raise AdapterValidationError(f"tensor {full} has dtype {tensor.dtype}; expected a float dtype")
                _check_values(full, tensor)


def _check_values(name: str, tensor: torch.Tensor) -> None:
    """Finite and within ±MAX_ABS_WEIGHT: one pass over the tensor (aminmax; NaN propagates into it)."""
    if tensor.numel() == 0:
        return
    low, high = (float(x) for x in torch.aminmax(tensor.detach()))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise AdapterValidationError(f"tensor {name} contains NaN or Inf")
    if max(-low, high) > MAX_ABS_WEIGHT:
        raise AdapterValidationError(
            f"tensor {name} holds a value of {max(-low, high):.3g} in absolute value; trained adapters stay far "
            f"below {MAX_ABS_WEIGHT:g}, and values this large overflow the forward pass")
