"""Rank classification for a batch: the template wrapped around each row's text, then every row's
own choices scored by the decoder (teacher-forced) in one pass over all (row, choice) pairs the batch
has — each pair with its row's encoder states and task parameters — split only to bound the
[pairs, tokens, vocabulary] logits (a loop over pieces of the batch, never over rows)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from switchboard.server.core.families import family_for
from switchboard.server.core.site_hooks import site_hooks
from switchboard.server.core.tuners.base import Readout


@dataclass
class ChoiceGroup:
    """Rows sharing a choice-pool shape. ids [R|1, C, Lc]; prefix / suffix [R|1, M] (-1 = none)."""

    rows: torch.Tensor | None
    ids: torch.Tensor
    prefix: torch.Tensor
    suffix: torch.Tensor


def _per_row(groups: list[ChoiceGroup], B: int, field: str, device: torch.device) -> torch.Tensor:
    """One [B, *, width] tensor of every row's values (-1 padded), assembled from the groups."""
    values = [getattr(g, field).long() for g in groups]
    shape = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
    out = torch.full((B, *shape), -1, dtype=torch.long, device=device)
    for g, value in zip(groups, values):
        window = (slice(None), *(slice(0, n) for n in value.shape[1:]))
        if g.rows is None:
            out[window] = value
        else:
            out[(g.rows, *window[1:])] = value
    return out


def wrap_in_template(input_ids: torch.Tensor, segments: torch.Tensor, prefix: torch.Tensor,
                     suffix: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row → prefix + its text (without its closing token) + suffix + its closing token; right padded.
    input_ids, segments [B, T] (right padded; a segment mask: 1 first text, 2 second, 0 pad); prefix,
    suffix [B, M] (-1 padded). The text keeps its segments (a row without a template is unchanged, so a
    pair-pooled head task in the same batch still sees both texts); template tokens count as the first."""
    B, T = input_ids.shape
    n = (segments > 0).sum(1)  # tokens of each text, its closing token last
    p, s = (prefix >= 0).sum(1), (suffix >= 0).sum(1)
    total = p + n + s
    width = int(total.max())
    j = torch.arange(width, device=input_ids.device)[None, :]
    text_at = (j - p[:, None]).clamp(0, T - 1)
    suffix_at = (j - p[:, None] - (n[:, None] - 1)).clamp(0, suffix.shape[1] - 1)
    ids = torch.where(j < p[:, None], prefix.gather(1, j.clamp(max=prefix.shape[1] - 1).expand(B, -1)),
                      input_ids.gather(1, text_at))
    in_suffix = (j >= p[:, None] + n[:, None] - 1) & (j < total[:, None] - 1)
    ids = torch.where(in_suffix, suffix.gather(1, suffix_at), ids)
    last = j == total[:, None] - 1
    closing = (n - 1).clamp_min(0)[:, None]
    ids = torch.where(last, input_ids.gather(1, closing).expand(B, width), ids)
    in_text = (j >= p[:, None]) & (j < p[:, None] + n[:, None] - 1)
    seg = torch.where(in_text, segments.gather(1, text_at), 1)
    seg = torch.where(last, segments.gather(1, closing).expand(B, width), seg)
    real = j < total[:, None]
    return torch.where(real, ids, pad_id), torch.where(real, seg, 0).to(segments.dtype)


MAX_DECODER_TOKENS = 2048  # (pair, token) positions per decoder pass: bounds its [.., vocabulary] logits
MAX_ENCODER_POSITIONS = 16384  # (pair, input token) positions per pass: bounds each pair's copy of the
# encoder states and the cross-attention keys and values projected from them


def _decoder_rows(model: torch.nn.Module) -> Callable[[torch.Tensor], AbstractContextManager[None]]:
    """A context in which the site hooks hold the parameters of these rows of the batch (a row once per
    pair it has), at the decoder's sites."""
    family = family_for(model.config.model_type)
    hooks = site_hooks(model, family) if family is not None else None
    params = hooks.params() if hooks is not None else None
    if hooks is None or family is None or params is None:
        return lambda rows: nullcontext()
    sites = tuple(s for s, ref in family.sites.items() if ref.stack == "decoder.block")
    return lambda rows: hooks.active(params.rows(rows, sites))


def choice_log_probs(model: torch.nn.Module, hidden: torch.Tensor, attention: torch.Tensor,
                     ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of every choice [B, C, Lc] (0 where there is none) and where they are
    real tokens (bool). ids [B, C, Lc] (-1 padded; a row with fewer choices has all -1 there)."""
    B, C, Lc = ids.shape
    start = int(model.config.decoder_start_token_id or 0)
    valid = ids >= 0
    pair_row, pair_choice = valid[:, :, 0].nonzero(as_tuple=True)
    out = torch.zeros(B, C, Lc, dtype=torch.float32, device=hidden.device)
    rows_of = _decoder_rows(model)
    per_pass = max(1, min(MAX_DECODER_TOKENS // Lc, MAX_ENCODER_POSITIONS // max(1, hidden.shape[1])))
    for first in range(0, len(pair_row), per_pass):
        rows, choices = pair_row[first:first + per_pass], pair_choice[first:first + per_pass]
        labels = ids[rows, choices].clamp_min(0)  # [P, Lc]
        decoder_in = torch.cat([torch.full((len(rows), 1), start, dtype=labels.dtype, device=labels.device),
                                labels[:, :-1]], dim=1)
        with rows_of(rows):
            logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden.index_select(0, rows)),
                           attention_mask=attention.index_select(0, rows), decoder_input_ids=decoder_in,
                           use_cache=False).logits
        out[rows, choices] = F.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    return out, valid


def length_normalised(log_probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, C]: each choice's mean token log-probability; -inf for a choice the row does not have."""
    count = valid.sum(-1)
    scores = (log_probs * valid).sum(-1) / count.clamp_min(1)
    return scores.masked_fill(count == 0, float("-inf"))


class ChoiceParams(Readout):
    def __init__(self, groups: list[ChoiceGroup] | None = None) -> None:
        self.groups = groups if groups is not None else []

    def _rows(self, B: int, field: str, device: torch.device) -> torch.Tensor:
        return _per_row(self.groups, B, field, device)

    def prepare_inputs(self, input_ids: torch.Tensor, segments: torch.Tensor,
                       pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = self._rows(input_ids.shape[0], "prefix", input_ids.device)
        suffix = self._rows(input_ids.shape[0], "suffix", input_ids.device)
        if bool((prefix < 0).all() and (suffix < 0).all()):
            return input_ids, segments
        return wrap_in_template(input_ids, segments, prefix, suffix, pad_id)

    def token_log_probs(self, model: torch.nn.Module, hidden: torch.Tensor,
                        attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return choice_log_probs(model, hidden, attention, self._rows(hidden.shape[0], "ids", hidden.device))

    def logits(self, model: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, C_max] length-normalised log-probabilities; -inf past each row's choice count, and on rows of
        other readouts (which have no pairs: the decoder never runs for them)."""
        return length_normalised(*self.token_log_probs(model, hidden, (attention_mask > 0).long()))
