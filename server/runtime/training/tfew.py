"""T-Few's loss for rank classification (Liu et al. 2022, §3.2): with each choice's per-token
log-probabilities, L = L_LM (cross-entropy of the correct choice's tokens) + L_UL (unlikelihood: push
down every token of the wrong choices, −log(1 − p)) + L_LN (cross-entropy over the choices'
length-normalised log-probabilities, the scores the server ranks by)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from switchboard.server.core.tuners.choices.layer import length_normalised


def tfew_loss(log_probs: torch.Tensor, valid: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log_probs, valid: [B, C, Lc] (valid: real tokens of each choice); y [B] the correct choice."""
    valid = valid.to(log_probs.dtype)
    correct = F.one_hot(y, log_probs.shape[1]).to(log_probs.dtype)[..., None] * valid  # [B, C, Lc]
    wrong = valid - correct
    lm = -(log_probs * correct).sum() / correct.sum().clamp_min(1)
    p = log_probs.exp().clamp(max=1 - 1e-6)
    unlikelihood = -(torch.log1p(-p) * wrong).sum() / wrong.sum().clamp_min(1)
    ln = F.cross_entropy(length_normalised(log_probs, valid.bool()), y)
    return lm + unlikelihood + ln
