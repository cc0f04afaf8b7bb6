"""(IA)3 compute: each row is multiplied by its own task's vector."""

from __future__ import annotations

import torch

from switchboard.server.core.tuners.base import SiteParams


def scale(x: torch.Tensor, vectors: torch.Tensor, layer: int) -> torch.Tensor:
    """x: [B, T, dim]; vectors: [B or 1, L, 1, dim] gathered per row.

    In inference the product is taken in place: x is a fresh projection output, and skipping the
    allocation keeps this memory-bound step cheap. With autograd on, a new tensor is returned.
    """
    if torch.is_grad_enabled():
        return x * vectors[:, layer]
    return x.mul_(vectors[:, layer])


class Ia3Params(SiteParams):
    """site → vectors [B|1, L, 1, dim]; rows of other tasks carry ones (exact identity)."""

    def __init__(self, vectors: dict[str, torch.Tensor] | None = None) -> None:
        self.vectors = vectors if vectors is not None else {}

    @property
    def sites(self) -> frozenset[str]:
        return frozenset(self.vectors)

    def apply(self, site: str, x: torch.Tensor, layer: int, module: torch.nn.Module) -> torch.Tensor:
        return scale(x, self.vectors[site], layer)

    def scale(self, site: str, layer: int) -> torch.Tensor:
        return self.vectors[site][:, layer, 0]

    def without(self, sites: tuple[str, ...]) -> Ia3Params:
        return Ia3Params({site: v for site, v in self.vectors.items() if site not in sites})

    def per_row(self, site: str) -> bool:
        return self.vectors[site].shape[0] > 1

    def rows(self, index: torch.Tensor) -> Ia3Params:
        return Ia3Params({site: v.index_select(0, index.to(v.device)) if v.shape[0] > 1 else v
                          for site, v in self.vectors.items()})
