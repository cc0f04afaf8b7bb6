"""Houlsby bottleneck compute for a group of rows that share an activation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

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
