"""Per-task LayerNorm gains and biases (Houlsby et al. train them alongside the adapters)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from switchboard.server.core.families import family_for


@dataclass
class LayerNormWeights:
    """weight, bias: [num_layers, 2, d] for the attention (0) and FFN (1) sublayer LayerNorms."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def from_backbone(cls, model: torch.nn.Module) -> LayerNormWeights:
        """Start from the backbone's own values, so a fresh copy changes nothing."""
        family = family_for(model.config.model_type)
        refs = [family.sites[s] for s in ("attn_norm", "ffn_norm")] if family else []
        if len(refs) != 2:
            raise ValueError("this backbone has no post-sublayer LayerNorms to tune")
        layers = model.get_submodule(refs[0].stack)
        norms = [[layer.get_submodule(ref.path) for ref in refs] for layer in layers]
        weight = torch.stack([torch.stack([n.weight for n in pair]) for pair in norms])
        bias = torch.stack([torch.stack([n.bias for n in pair]) for pair in norms])
        return cls(weight.detach().float().clone(), bias.detach().float().clone())
