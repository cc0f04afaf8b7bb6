"""The functional forward of a BERT-family encoder with per-row task parameters.

Both the serving engine (parameters gathered from slot pools) and the trainer (one task's parameters,
broadcast over the batch) call `encoder_forward`, so what is trained is exactly what is served.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from server.tuners.head.layer import classify, pool
from server.tuners.houlsby.layer import bottleneck
from server.tuners.ia3.layer import scale
from server.tuners.layer_norm.layer import layer_norm


@dataclass
class HoulsbyGroup:
    """Rows sharing width and activation. Weights [R|1, L, 2, …] in (in, out) layout; rows None = all."""

    rows: torch.Tensor | None
    down: torch.Tensor
    down_b: torch.Tensor
    up: torch.Tensor
    up_b: torch.Tensor
    activation: str


@dataclass
class HeadGroup:
    """Rows sharing pooling, label count and hidden-layer presence. Weights [R|1, in, out]."""

    rows: torch.Tensor | None
    pooling: str
    out_w: torch.Tensor
    out_b: torch.Tensor
    hidden_w: torch.Tensor | None = None
    hidden_b: torch.Tensor | None = None


@dataclass
class BatchParams:
    """Per-row task parameters for one batch. Leading dim is the batch (or 1 to broadcast)."""

    ia3: dict[str, torch.Tensor] = field(default_factory=dict)  # site → [B|1, L, 1, dim]
    houlsby: list[HoulsbyGroup] = field(default_factory=list)
    layer_norm: tuple[torch.Tensor, torch.Tensor] | None = None  # (weight, bias) [B|1, L, 2, 1, d]
    heads: list[HeadGroup] = field(default_factory=list)


def _add_houlsby(out: torch.Tensor, groups: list[HoulsbyGroup], layer: int, sublayer: int) -> torch.Tensor:
    """out is a fresh projection output, so in inference the adapter is added in place."""
    inplace = not torch.is_grad_enabled()
    for g in groups:
        w = (g.down[:, layer, sublayer], g.down_b[:, layer, sublayer], g.up[:, layer, sublayer],
             g.up_b[:, layer, sublayer])
        if g.rows is None:
            delta = bottleneck(out, *w, g.activation)
            out = out.add_(delta) if inplace else out + delta
        else:
            delta = bottleneck(out.index_select(0, g.rows), *w, g.activation)
            out = out.index_add_(0, g.rows, delta) if inplace else out.index_add(0, g.rows, delta)
    return out


def _linear(x: torch.Tensor, module: torch.nn.Linear) -> torch.Tensor:
    """Matmul in the weights' dtype (bf16 or fp32); the residual stream keeps its own dtype."""
    return F.linear(x.to(module.weight.dtype), module.weight, module.bias)


def _encoder_layer(layer: torch.nn.Module, h: torch.Tensor, mask: torch.Tensor, index: int,
                   p: BatchParams, num_heads: int) -> torch.Tensor:
    B, T, d = h.shape
    attn = layer.attention
    sa = attn.self
    q = _linear(h, sa.query)
    k = scale(_linear(h, sa.key), p.ia3.get("k_out"), index)
    v = scale(_linear(h, sa.value), p.ia3.get("v_out"), index)
    heads = (B, T, num_heads, d // num_heads)
    # Attention scores and softmax in the residual stream's dtype (float32): ~2 % of the FLOPs, and
    # the largest source of bf16 error otherwise.
    q, k, v = (x.to(h.dtype).view(heads).transpose(1, 2) for x in (q, k, v))
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ctx = scale(ctx.transpose(1, 2).reshape(B, T, d), p.ia3.get("attn_out_in"), index)
    out = _add_houlsby(_linear(ctx, attn.output.dense), p.houlsby, index, 0)
    h = layer_norm(out.to(h.dtype) + h, attn.output.LayerNorm, p.layer_norm, index, 0)

    inter = layer.intermediate
    z = scale(_linear(h, inter.dense), p.ia3.get("ffn_int_out"), index)
    z = scale(inter.intermediate_act_fn(z), p.ia3.get("ffn_out_in"), index)
    out = _add_houlsby(_linear(z, layer.output.dense), p.houlsby, index, 1)
    return layer_norm(out.to(h.dtype) + h, layer.output.LayerNorm, p.layer_norm, index, 1)


def encode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           params: BatchParams) -> torch.Tensor:
    """Last hidden states [B, T, d] with each row's task modules applied."""
    h = model.embeddings(input_ids=input_ids)
    mask = attention_mask.bool()[:, None, None, :]
    num_heads = model.config.num_attention_heads
    for index, layer in enumerate(model.encoder.layer):
        h = _encoder_layer(layer, h, mask, index, params, num_heads)
    return h


def heads_forward(model: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                  groups: list[HeadGroup]) -> torch.Tensor:
    """Logits [B, C_max] in float32; columns past a row's own label count are -inf."""
    B = hidden.shape[0]
    width = max(g.out_w.shape[-1] for g in groups)
    logits = torch.full((B, width), float("-inf"), dtype=torch.float32, device=hidden.device)
    pooler = getattr(model, "pooler", None)
    for g in groups:
        rows_h = hidden if g.rows is None else hidden.index_select(0, g.rows)
        rows_m = attention_mask if g.rows is None else attention_mask.index_select(0, g.rows)
        feats = pool(rows_h, rows_m, g.pooling, pooler).to(g.out_w.dtype)
        out = classify(feats, g.out_w, g.out_b, g.hidden_w, g.hidden_b).float()
        if g.rows is None:
            logits[:, : out.shape[1]] = out
        else:
            logits[g.rows, : out.shape[1]] = out
    return logits


def encoder_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    params: BatchParams) -> torch.Tensor:
    hidden = encode(model, input_ids, attention_mask, params)
    return heads_forward(model, hidden, attention_mask, params.heads)
