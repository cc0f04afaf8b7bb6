"""Head compute for a group of rows sharing pooling, hidden-layer presence and label count."""

from __future__ import annotations

import torch


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, pooler: torch.nn.Module | None) -> torch.Tensor:
    """hidden [R, T, d], mask [R, T] (1 = token) → [R, d]."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    if pooling == "pooler":
        if pooler is None:
            raise ValueError("this backbone has no pooler; use 'cls' or 'mean' pooling")
        return torch.tanh(pooler.dense(hidden[:, 0]))
    raise ValueError(f"unknown pooling {pooling!r}")


def classify(features: torch.Tensor, out_w: torch.Tensor, out_b: torch.Tensor,
             hidden_w: torch.Tensor | None, hidden_b: torch.Tensor | None) -> torch.Tensor:
    """features [R, d]; weights in (in, out) layout with a row dim of R or 1 → logits [R, C]."""
    x = features.unsqueeze(1)
    if hidden_w is not None and hidden_b is not None:
        x = torch.tanh(torch.matmul(x, hidden_w) + hidden_b)
    return (torch.matmul(x, out_w) + out_b).squeeze(1)
