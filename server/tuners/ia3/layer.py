"""(IA)3 compute: each row is multiplied by its own task's vector."""

from __future__ import annotations

import torch


def scale(x: torch.Tensor, vectors: torch.Tensor | None, layer: int) -> torch.Tensor:
    """x: [B, T, dim]; vectors: [B or 1, L, 1, dim] gathered per row, or None (identity)."""
    if vectors is None:
        return x
    return x * vectors[:, layer]
