"""Houlsby bottleneck compute for groups of rows that share a width and an activation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from switchboard.server.core.tuners.base import SiteParams


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU (transformers' "gelu_new", which AdapterHub's configs name)."""
    return F.gelu(x, approximate="tanh")


ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}
# site → sublayer index in the pooled weights
SUBLAYER_OF_SITE: dict[str, int] = {"attn_out": 0, "ffn_out": 1}


def bottleneck(x: torch.Tensor, down: torch.Tensor, down_b: torch.Tensor, up: torch.Tensor,
               up_b: torch.Tensor, activation: str) -> torch.Tensor:
    """up(f(down(x))) without the skip; x [R, T, d]; down [R|1, d, m] (in, out layout); biases [R|1, 1, *].

    With one weight for all rows (a single task, or a segment of one task) the weight is 2-D, so the
    product folds into one GEMM instead of a batched one.
    """
    if down.shape[0] == 1:
        z = torch.addmm(down_b[0], x.reshape(-1, x.shape[-1]), down[0]).view(*x.shape[:-1], -1)
        z = ACTIVATION_FNS[activation](z)
        return torch.addmm(up_b[0], z.reshape(-1, z.shape[-1]), up[0]).view(x.shape)
    z = torch.baddbmm(down_b, x, down)
    z = ACTIVATION_FNS[activation](z)
    return torch.baddbmm(up_b, z, up)


@dataclass
class HoulsbyGroup:
    """Rows sharing width and activation. Weights [R|1, L, 2, …] in (in, out) layout; rows None = all."""

    rows: torch.Tensor | None
    down: torch.Tensor
    down_b: torch.Tensor
    up: torch.Tensor
    up_b: torch.Tensor
    activation: str


class HoulsbyParams(SiteParams):
    def __init__(self, groups: list[HoulsbyGroup] | None = None) -> None:
        self.groups = groups if groups is not None else []

    @property
    def sites(self) -> frozenset[str]:
        return frozenset(SUBLAYER_OF_SITE) if self.groups else frozenset()

    def apply(self, site: str, x: torch.Tensor, layer: int, module: torch.nn.Module) -> torch.Tensor:
        """x is a fresh projection output, so in inference the adapter is added in place."""
        sublayer = SUBLAYER_OF_SITE[site]
        inplace = not torch.is_grad_enabled()
        for g in self.groups:
            w = (g.down[:, layer, sublayer], g.down_b[:, layer, sublayer], g.up[:, layer, sublayer],
                 g.up_b[:, layer, sublayer])
            if g.rows is None:
                delta = bottleneck(x, *w, g.activation)
                x = x.add_(delta) if inplace else x + delta
            else:
                delta = bottleneck(x.index_select(0, g.rows), *w, g.activation)
                x = x.index_add_(0, g.rows, delta) if inplace else x.index_add(0, g.rows, delta)
        return x
