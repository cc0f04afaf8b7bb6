"""The forward of a backbone with per-row task parameters, for every family (core/families/).

Both the serving engine (parameters gathered from slot pools) and the trainer (one task's parameters,
broadcast over the batch) call `encoder_forward`, so what is trained is exactly what is served. The
forward knows only sites (tuners/base.py); each kind's gathered parameters say where they act. BERT's
layer runs as the functional fast path below; every other family runs Hugging Face's own forward with
the sites' hooks (core/site_hooks.py) reading this batch's parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from switchboard.server.core.families import Family, family_for
from switchboard.server.core.site_hooks import site_hooks
from switchboard.server.core.tokenize import split_segments
from switchboard.server.core.tuners import KINDS_BY_NAME, READOUTS
from switchboard.server.core.tuners.base import NORM_SITES, Readout, SiteParams


class BatchParams:
    """Every kind's parameters for one batch, indexed by the site where they act.

    task_slots: each row's task (CPU), for the few places that must run per task of a chunk
    (DeBERTa's shared-key position bias); None when one task's parameters are broadcast."""

    def __init__(self, parts: Mapping[str, Any] | None = None, task_slots: torch.Tensor | None = None) -> None:
        self.parts = dict(parts or {})
        self.task_slots = task_slots
        self._by_site: dict[str, list[SiteParams]] = {}
        order = {name: i for i, name in enumerate(KINDS_BY_NAME)}  # kinds sharing a site apply in KINDS order
        for name in sorted(self.parts, key=lambda n: order.get(n, len(order))):
            part = self.parts[name]
            if isinstance(part, SiteParams):
                for site in part.sites:
                    self._by_site.setdefault(site, []).append(part)
        if any(len(self._by_site.get(site, ())) > 1 for site in NORM_SITES):
            raise ValueError("at most one kind may replace a LayerNorm")

    def at(self, site: str) -> list[SiteParams]:
        return self._by_site.get(site, [])

    def per_row(self, site: str) -> bool:
        """Whether rows may differ at this site (parameters gathered per row, not one broadcast task)."""
        return any(part.per_row(site) for part in self.at(site))

    def task_groups(self) -> list[torch.Tensor] | None:
        """Row indices of each task in the batch; None when every row shares one task."""
        if self.task_slots is None:
            return None
        tasks = torch.unique(self.task_slots)
        if len(tasks) < 2:
            return None
        return [(self.task_slots == t).nonzero().squeeze(1) for t in tasks]

    def scale_at(self, site: str, layer: int) -> torch.Tensor | None:
        """Each row's elementwise scale at `site` [B|1, dim] (None: no part acts there); NotImplemented
        when a part there is not a pure scale."""
        scale = None
        for part in self.at(site):
            s = part.scale(site, layer)
            if s is NotImplemented:
                return NotImplemented
            scale = s if scale is None else scale * s
        return scale

    def without(self, sites: tuple[str, ...]) -> BatchParams:
        """The same parameters with nothing acting at these sites (parts there must be pure scales)."""
        return BatchParams({name: part.without(sites) if isinstance(part, SiteParams) else part
                            for name, part in self.parts.items()}, task_slots=self.task_slots)

    def rows(self, index: torch.Tensor, sites: tuple[str, ...]) -> BatchParams:
        """These rows' parameters at these sites only (for a piece of a layer run per task)."""
        return BatchParams({name: part.rows(index) for name, part in self.parts.items()
                            if isinstance(part, SiteParams) and part.sites & set(sites)})

    @property
    def readout(self) -> Readout:
        """The batch's readout; rows of T5 tasks with a head and with answer choices: both, each on its rows."""
        present = [self.parts[name] for name in READOUTS if name in self.parts]
        return present[0] if len(present) == 1 else EachOnItsRows(present)


class EachOnItsRows(Readout):
    """Several readouts in one batch (a T5 backbone's head tasks beside its rank-classification tasks):
    each scores only its own rows and leaves -inf elsewhere, so the row-wise maximum is every row's answer."""

    def __init__(self, readouts: list[Readout]) -> None:
        self.readouts = readouts

    def prepare_inputs(self, input_ids: torch.Tensor, segments: torch.Tensor,
                       pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        for readout in self.readouts:
            input_ids, segments = readout.prepare_inputs(input_ids, segments, pad_id)
        return input_ids, segments

    def logits(self, model: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        parts = [r.logits(model, hidden, attention_mask) for r in self.readouts]
        width = max(p.shape[1] for p in parts)
        out = torch.full((hidden.shape[0], width), float("-inf"), device=hidden.device)
        for p in parts:
            out[:, : p.shape[1]] = torch.maximum(out[:, : p.shape[1]], p)
        return out


def _site(p: BatchParams, site: str, x: torch.Tensor, layer: int, module: torch.nn.Module) -> torch.Tensor:
    for part in p.at(site):
        x = part.apply(site, x, layer, module)
    return x


def _norm(p: BatchParams, site: str, x: torch.Tensor, layer: int, module: torch.nn.LayerNorm) -> torch.Tensor:
    parts = p.at(site)
    if parts:
        return parts[0].apply(site, x, layer, module)
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _linear(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """Matmul in the weights' dtype (bf16 or fp32); the residual stream keeps its own dtype. A
    quantized Linear (int8 precision) takes float32 and quantizes its input itself."""
    if isinstance(module, torch.nn.Linear):
        return F.linear(x.to(module.weight.dtype), module.weight, module.bias)
    return module(x.float())


def _bert_layer(layer: torch.nn.Module, h: torch.Tensor, mask: torch.Tensor, index: int,
                p: BatchParams, num_heads: int) -> torch.Tensor:
    B, T, d = h.shape
    attn = layer.attention
    sa = attn.self
    q = _site(p, "q_out", _linear(h, sa.query), index, sa.query)
    k = _site(p, "k_out", _linear(h, sa.key), index, sa.key)
    v = _site(p, "v_out", _linear(h, sa.value), index, sa.value)
    heads = (B, T, num_heads, d // num_heads)
    # Attention scores and softmax in the residual stream's dtype (float32): ~2 % of the FLOPs, and
    # the largest source of bf16 error otherwise.
    q, k, v = (x.to(h.dtype).view(heads).transpose(1, 2) for x in (q, k, v))
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ctx = _site(p, "attn_out_in", ctx.transpose(1, 2).reshape(B, T, d), index, attn.output.dense)
    out = _site(p, "attn_out", _linear(ctx, attn.output.dense), index, attn.output.dense)
    h = _norm(p, "attn_norm", out.to(h.dtype) + h, index, attn.output.LayerNorm)

    inter, output = layer.intermediate, layer.output
    z = _site(p, "ffn_int_out", _linear(h, inter.dense), index, inter.dense)
    z = _site(p, "ffn_out_in", inter.intermediate_act_fn(z), index, output.dense)
    out = _site(p, "ffn_out", _linear(z, output.dense), index, output.dense)
    return _norm(p, "ffn_norm", out.to(h.dtype) + h, index, output.LayerNorm)


def _bert_encode(model: torch.nn.Module, input_ids: torch.Tensor, attention: torch.Tensor,
                 token_types: torch.Tensor, params: BatchParams) -> torch.Tensor:
    if getattr(model.config, "type_vocab_size", 1) > 1:
        h = model.embeddings(input_ids=input_ids, token_type_ids=token_types)
    else:
        h = model.embeddings(input_ids=input_ids)
    mask = attention.bool()[:, None, None, :]
    num_heads = model.config.num_attention_heads
    for index, layer in enumerate(model.encoder.layer):
        h = _bert_layer(layer, h, mask, index, params, num_heads)
    return h


def _hooked_encode(family: Family, model: torch.nn.Module, input_ids: torch.Tensor, attention: torch.Tensor,
                   token_types: torch.Tensor) -> torch.Tensor:
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention, **family.call_kwargs}
    if getattr(model.config, "type_vocab_size", 1) > 1:
        kwargs["token_type_ids"] = token_types
    return family.encoder(model)(**kwargs).last_hidden_state


def family_of(model: torch.nn.Module) -> Family:
    family = family_for(getattr(model.config, "model_type", "?"))
    if family is None:
        raise ValueError(f"no backbone family for model type {model.config.model_type!r}")
    return family


def encode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           params: BatchParams) -> torch.Tensor:
    """Last hidden states [B, T, d] with each row's task modules applied. attention_mask: a segment mask
    (core/tokenize.py: 0 pad, 1 first text, 2 second text of a pair) or a plain 0/1 mask."""
    attention, token_types = split_segments(attention_mask)
    family = family_of(model)
    if family.functional:
        return _bert_encode(model, input_ids, attention, token_types, params)
    with site_hooks(model, family).active(params):
        return _hooked_encode(family, model, input_ids, attention, token_types)


def encoder_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    params: BatchParams) -> torch.Tensor:
    """Logits [B, C_max] (float32, -inf past each row's label count). The readout reads the segment
    mask (pair pooling); a rank-classification readout runs the decoder, with the hooks still active."""
    family = family_of(model)
    if family.functional:
        return params.readout.logits(model, encode(model, input_ids, attention_mask, params), attention_mask)
    return _hooked_forward(family, model, input_ids, attention_mask, params,
                           lambda readout, hidden, mask: readout.logits(model, hidden, mask))


def choice_token_log_probs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           params: BatchParams) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-classification batch's per-token choice log-probabilities [B, C, Lc] and their validity
    (T-Few's training loss reads them; serving reads their length-normalised means)."""
    return _hooked_forward(family_of(model), model, input_ids, attention_mask, params,
                           lambda readout, hidden, mask: readout.token_log_probs(model, hidden, (mask > 0).long()))


def _hooked_forward(family: Family, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    params: BatchParams, read: Any) -> Any:
    readout = params.readout
    # a prompt template around each row's text (T5 tasks); the same tensors otherwise
    input_ids, attention_mask = readout.prepare_inputs(input_ids, attention_mask, int(model.config.pad_token_id or 0))
    attention, token_types = split_segments(attention_mask)
    with site_hooks(model, family).active(params):
        hidden = _hooked_encode(family, model, input_ids, attention, token_types)
        return read(readout, hidden, attention_mask)
