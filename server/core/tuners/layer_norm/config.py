"""Per-task LayerNorm gains and biases (Houlsby et al. train them alongside the adapters)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerNormWeights:
    """weight, bias: [num_layers, 2, d] for the attention (0) and FFN (1) sublayer LayerNorms."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def from_backbone(cls, model: torch.nn.Module) -> LayerNormWeights:
        """Start from the backbone's own values, so a fresh copy changes nothing."""
        layers = model.encoder.layer
        weight = torch.stack([torch.stack([l.attention.output.LayerNorm.weight, l.output.LayerNorm.weight])
                              for l in layers])
        bias = torch.stack([torch.stack([l.attention.output.LayerNorm.bias, l.output.LayerNorm.bias])
                            for l in layers])
        return cls(weight.detach().float().clone(), bias.detach().float().clone())
