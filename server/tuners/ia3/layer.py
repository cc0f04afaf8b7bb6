"""(IA)3 compute: each row is multiplied by its own task's vector."""

from __future__ import annotations

import torch


def scale(x: torch.Tensor, vectors: torch.Tensor | None, layer: int) -> torch.Tensor:
    """x: [B, T, dim]; vectors: [B or 1, L, 1, dim] gathered per row, or None (identity).

    In inference the product is taken in place: x is a fresh projection output, and skipping the
    allocation keeps this memory-bound step cheap. With autograd on, a new tensor is returned.
    """
    if vectors is None:
        return x
    if torch.is_grad_enabled():
        return x * vectors[:, layer]
    return x.mul_(vectors[:, layer])
