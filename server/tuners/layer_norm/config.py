"""Per-task LayerNorm gains and biases (Houlsby et al. train them alongside the adapters)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.backbone import BackboneSpec


@dataclass
class LayerNormWeights:
    """weight, bias: [num_layers, 2, d] for the attention (0) and FFN (1) sublayer LayerNorms."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def from_backbone(cls, model: torch.nn.Module) -> "LayerNormWeights":
        """Start from the backbone's own values, so a fresh copy changes nothing."""
        layers = model.encoder.layer
        weight = torch.stack([torch.stack([l.attention.output.LayerNorm.weight, l.output.LayerNorm.weight])
                              for l in layers])
        bias = torch.stack([torch.stack([l.attention.output.LayerNorm.bias, l.output.LayerNorm.bias])
                            for l in layers])
        return cls(weight.detach().float().clone(), bias.detach().float().clone())

    def expected_shapes(self, spec: BackboneSpec) -> dict[str, tuple[int, ...]]:
        shape = (spec.num_layers, 2, spec.hidden_size)
        return {"layer_norm.weight": shape, "layer_norm.bias": shape}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"layer_norm.weight": self.weight, "layer_norm.bias": self.bias}
