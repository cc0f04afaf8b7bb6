"""DeBERTa-v2/v3: disentangled attention. With shared attention keys (v3) the key and query projections
also project the relative-position embeddings, which one row of a mixed batch must see through its own
task's vectors: the position bias is computed once per task of the chunk (a loop over tasks, not rows)."""

from __future__ import annotations

from typing import Any

import torch

from switchboard.server.core.families.base import Family, SiteRef

_L = "encoder.layer"
_SHARED_KEY_SITES = ("q_out", "k_out")  # sites whose module also projects the position embeddings


def _install(model: torch.nn.Module, hooks: Any) -> None:
    for attention in (layer.attention.self for layer in model.get_submodule(_L)):
        if getattr(attention, "share_att_key", False) and getattr(attention, "relative_attention", False):
            original = attention.__dict__.get("_switchboard_original_bias") or attention.disentangled_attention_bias
            attention.__dict__["_switchboard_original_bias"] = original
            attention.__dict__["disentangled_attention_bias"] = _per_task_bias(original, hooks,
                                                                               attention.num_attention_heads)


def _per_task_bias(bias: Any, hooks: Any, heads: int) -> Any:
    def run(query_layer: torch.Tensor, key_layer: torch.Tensor, relative_pos: Any, rel_embeddings: torch.Tensor,
            scale_factor: int) -> torch.Tensor:
        params = hooks.params()
        groups = params.task_groups() if params is not None and any(
            params.per_row(site) for site in _SHARED_KEY_SITES) else None
        if groups is None:
            return bias(query_layer, key_layer, relative_pos, rel_embeddings, scale_factor)
        B = query_layer.shape[0] // heads
        q, k = (x.view(B, heads, *x.shape[1:]) for x in (query_layer, key_layer))
        out: torch.Tensor | None = None
        for rows in groups:
            with hooks.active(params.rows(rows[:1], _SHARED_KEY_SITES)):
                part = bias(q[rows].flatten(0, 1), k[rows].flatten(0, 1), relative_pos, rel_embeddings, scale_factor)
            part = part.view(len(rows), heads, *part.shape[1:])
            if out is None:
                out = part.new_empty(B, *part.shape[1:])
            out[rows] = part
        assert out is not None
        return out.flatten(0, 1)

    return run


DEBERTA_V2 = Family(
    name="deberta-v2",
    model_types=("deberta-v2",),
    sites={
        "q_out": SiteRef(_L, "attention.self.query_proj", "out"),
        "k_out": SiteRef(_L, "attention.self.key_proj", "out"),
        "v_out": SiteRef(_L, "attention.self.value_proj", "out"),
        "attn_out_in": SiteRef(_L, "attention.output.dense", "in"),
        "attn_out": SiteRef(_L, "attention.output.dense", "out"),
        "attn_norm": SiteRef(_L, "attention.output.LayerNorm", "norm"),
        "ffn_int_out": SiteRef(_L, "intermediate.dense", "out"),
        "ffn_out_in": SiteRef(_L, "output.dense", "in"),
        "ffn_out": SiteRef(_L, "output.dense", "out"),
        "ffn_norm": SiteRef(_L, "output.LayerNorm", "norm"),
    },
    pooling="cls",
    attention="eager",
    install=_install,
    notes="shared-key relative position bias computed per task of a chunk",
)
