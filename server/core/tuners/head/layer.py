"""Head compute for groups of rows sharing pooling, hidden-layer presence and label count."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from switchboard.server.core.tuners.base import Readout
from switchboard.server.core.tuners.houlsby.layer import ACTIVATION_FNS


def _mean(hidden: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    weights = where.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, pooler: torch.nn.Module | None) -> torch.Tensor:
    """hidden [R, T, d], mask [R, T] (> 0 = token; a segment mask: 1 first text, 2 second) → [R, d]
    ([R, 4d] for pair pooling; a single text's second part is zeros)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        return _mean(hidden, mask > 0)
    if pooling == "pair":
        u = F.normalize(_mean(hidden, mask == 1).float(), dim=-1)
        v = F.normalize(_mean(hidden, mask > 1).float(), dim=-1)
        return torch.cat([u, v, (u - v).abs(), u * v], dim=-1).to(hidden.dtype)
    if pooling == "last":
        last = ((mask > 0).sum(1) - 1).clamp_min(0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "pooler":
        if pooler is None:
            raise ValueError("this backbone has no pooler; use 'cls' or 'mean' pooling")
        first = hidden[:, 0].to(pooler.dense.weight.dtype)  # the pooler is bf16 in bf16-full precision
        return torch.tanh(pooler.dense(first))
    raise ValueError(f"unknown pooling {pooling!r}")


def classify(features: torch.Tensor, out_w: torch.Tensor, out_b: torch.Tensor,
             hidden_w: torch.Tensor | None, hidden_b: torch.Tensor | None, activation: str = "tanh",
             norm_w: torch.Tensor | None = None, norm_b: torch.Tensor | None = None,
             norm_eps: float = 1e-5) -> torch.Tensor:
    """features [R, d]; weights in (in, out) layout with a row dim of R or 1 → logits [R, C]."""
    x = features.unsqueeze(1)
    if hidden_w is not None and hidden_b is not None:
        x = ACTIVATION_FNS[activation](torch.matmul(x, hidden_w) + hidden_b)
    if norm_w is not None and norm_b is not None:
        x = torch.addcmul(norm_b, F.layer_norm(x, x.shape[-1:], eps=norm_eps), norm_w)
    return (torch.matmul(x, out_w) + out_b).squeeze(1)


@dataclass
class HeadGroup:
    """Rows sharing pooling, label count and hidden-layer presence. Weights [R|1, in, out]."""

    rows: torch.Tensor | None
    pooling: str
    out_w: torch.Tensor
    out_b: torch.Tensor
    hidden_w: torch.Tensor | None = None
    hidden_b: torch.Tensor | None = None
    activation: str = "tanh"
    norm_w: torch.Tensor | None = None
    norm_b: torch.Tensor | None = None
    norm_eps: float = 1e-5


class HeadParams(Readout):
    def __init__(self, groups: list[HeadGroup] | None = None) -> None:
        self.groups = groups if groups is not None else []

    def logits(self, model: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, C_max] in float32; columns past a row's own label count are -inf."""
        B = hidden.shape[0]
        width = max(g.out_w.shape[-1] for g in self.groups)
        logits = torch.full((B, width), float("-inf"), dtype=torch.float32, device=hidden.device)
        pooler = getattr(model, "pooler", None)
        for g in self.groups:
            rows_h = hidden if g.rows is None else hidden.index_select(0, g.rows)
            rows_m = attention_mask if g.rows is None else attention_mask.index_select(0, g.rows)
            feats = pool(rows_h, rows_m, g.pooling, pooler).to(g.out_w.dtype)
            out = classify(feats, g.out_w, g.out_b, g.hidden_w, g.hidden_b, g.activation, g.norm_w, g.norm_b,
                           g.norm_eps).float()
            if g.rows is None:
                logits[:, : out.shape[1]] = out
            else:
                logits[g.rows, : out.shape[1]] = out
        return logits
