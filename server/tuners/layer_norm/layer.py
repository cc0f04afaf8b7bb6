"""LayerNorm whose gain and bias may differ per row."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm, per_row: tuple[torch.Tensor, torch.Tensor] | None,
               layer: int, sublayer: int) -> torch.Tensor:
    """per_row: (weight, bias) shaped [B|1, L, 2, 1, d], or None to use the backbone's own LayerNorm."""
    if per_row is None:
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    weight, bias = per_row
    normed = F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
    return torch.addcmul(bias[:, layer, sublayer], normed, weight[:, layer, sublayer])
