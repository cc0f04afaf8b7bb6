"""LayerNorm whose gain and bias may differ per row."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from switchboard.server.core.tuners.base import SiteParams

SUBLAYER_OF_SITE: dict[str, int] = {"attn_norm": 0, "ffn_norm": 1}


class LayerNormParams(SiteParams):
    """(weight, bias) shaped [B|1, L, 2, 1, d]; rows of other tasks carry the backbone's own values."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight, self.bias = weight, bias

    @property
    def sites(self) -> frozenset[str]:
        return frozenset(SUBLAYER_OF_SITE)

    def apply(self, site: str, x: torch.Tensor, layer: int, module: torch.nn.Module) -> torch.Tensor:
        sublayer = SUBLAYER_OF_SITE[site]
        normed = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        return torch.addcmul(self.bias[:, layer, sublayer], normed, self.weight[:, layer, sublayer])
