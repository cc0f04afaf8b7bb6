"""One task's trained parameters in the engine's canonical layout, whatever format they came from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from server.backbone import BackboneSpec
from server.tuners.head.config import POOLINGS, HeadWeights
from server.tuners.houlsby.config import HoulsbyWeights, canonical_activation
from server.tuners.ia3.config import IA3_SITES, Ia3Weights
from server.tuners.layer_norm.config import LayerNormWeights


class AdapterValidationError(ValueError):
    """The adapter does not fit the backbone or is malformed; the message names the first problem."""


@dataclass
class TaskAdapter:
    head: HeadWeights
    labels: list[str]
    ia3: Ia3Weights | None = None
    houlsby: HoulsbyWeights | None = None
    layer_norm: LayerNormWeights | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if self.ia3 is not None and self.houlsby is not None:
            return "mixed"
        if self.houlsby is not None:
            return "houlsby"
        if self.ia3 is not None:
            return "ia3"
        return "head"

    @property
    def num_labels(self) -> int:
        return self.head.num_labels

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name → tensor map: the native file's content and the basis of the content hash."""
        out: dict[str, torch.Tensor] = dict(self.head.tensors())
        for part in (self.ia3, self.houlsby, self.layer_norm):
            if part is not None:
                out |= part.tensors()
        return out

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def content_hash(self) -> str:
        """sha256 over tensors, labels and the settings that change the output (pooling, activation)."""
        digest = hashlib.sha256()
        settings = f"pooling={self.head.pooling};act={self.houlsby.activation if self.houlsby else ''}"
        digest.update(settings.encode())
        digest.update("\x1f".join(self.labels).encode())
        for name, tensor in sorted(self.tensors().items()):
            data = tensor.detach().to("cpu", torch.float32).contiguous()
            digest.update(name.encode())
            digest.update(str(tuple(data.shape)).encode())
            digest.update(data.numpy().tobytes())
        return digest.hexdigest()

    def validate(self, spec: BackboneSpec) -> None:
        """Check every tensor's shape and values against the backbone before anything is loaded."""
        if self.head.out_w.dim() != 2 or self.head.out_b.dim() != 1:
            raise AdapterValidationError("head.out_w must be 2-D [labels, hidden] and head.out_b 1-D")
        if self.head.pooling not in POOLINGS:
            raise AdapterValidationError(f"unknown pooling {self.head.pooling!r}; use one of {POOLINGS}")
        if self.head.pooling == "pooler" and not spec.has_pooler:
            raise AdapterValidationError("head pooling 'pooler' needs a backbone pooler; this backbone has none")
        if self.head.num_labels < 1:
            raise AdapterValidationError("the head has no labels")
        if len(self.labels) != self.head.num_labels:
            raise AdapterValidationError(
                f"{len(self.labels)} label names for a head with {self.head.num_labels} rows")
        if len(set(self.labels)) != len(self.labels):
            raise AdapterValidationError("label names must be unique")
        if (self.head.hidden_w is None) != (self.head.hidden_b is None):
            raise AdapterValidationError("head hidden layer needs both weight and bias")
        if self.ia3 is not None:
            unknown = set(self.ia3.vectors) - set(IA3_SITES)
            if unknown:
                raise AdapterValidationError(f"unknown (IA)3 site(s) {sorted(unknown)}")
        if self.houlsby is not None:
            try:
                self.houlsby.activation = canonical_activation(self.houlsby.activation)
            except ValueError as exc:
                raise AdapterValidationError(str(exc)) from exc
        expected: dict[str, tuple[int, ...]] = dict(self.head.expected_shapes(spec))
        for part in (self.ia3, self.houlsby, self.layer_norm):
            if part is not None:
                expected |= part.expected_shapes(spec)
        for name, tensor in self.tensors().items():
            if tuple(tensor.shape) != expected[name]:
                raise AdapterValidationError(
                    f"tensor {name} has shape {tuple(tensor.shape)}, expected {expected[name]} for this backbone")
            if not tensor.is_floating_point():
                raise AdapterValidationError(f"tensor {name} has dtype {tensor.dtype}; expected a float dtype")
            if not torch.isfinite(tensor).all():
                raise AdapterValidationError(f"tensor {name} contains NaN or Inf")
