"""DeBERTa-v2/v3: disentangled attention. With shared attention keys (v3) the key and query projections
also project the relative-position embeddings, which one row of a mixed batch must see through its own
task's vectors. For (IA)3 vectors that costs nothing: content→position is q·(s_k ⊙ K_rel) = (q ⊙ s_k)·K_rel
and position→content (s_k ⊙ k)·(s_q ⊙ Q_rel) = (k ⊙ s_q)·Q_rel, so the position embeddings are projected
once, unscaled, and each row's own scales move to its query and key. Any other kind at those sites falls
back to computing the position bias once per task of the chunk (a loop over tasks, not rows)."""

from __future__ import annotations

from typing import Any

import torch

from switchboard.server.core.families.base import Family, SiteRef

_L = "encoder.layer"
_SHARED_KEY_SITES = ("q_out", "k_out")  # sites whose module also projects the position embeddings


def _install(model: torch.nn.Module, hooks: Any) -> None:
    for index, attention in enumerate(layer.attention.self for layer in model.get_submodule(_L)):
        if getattr(attention, "share_att_key", False) and getattr(attention, "relative_attention", False):
            original = attention.__dict__.get("_switchboard_original_bias") or attention.disentangled_attention_bias
            attention.__dict__["_switchboard_original_bias"] = original
            attention.__dict__["disentangled_attention_bias"] = _per_row_bias(original, hooks,
                                                                              attention.num_attention_heads, index)


def _per_row_bias(bias: Any, hooks: Any, heads: int, layer: int) -> Any:
    def run(query_layer: torch.Tensor, key_layer: torch.Tensor, relative_pos: Any, rel_embeddings: torch.Tensor,
            scale_factor: int) -> torch.Tensor:
        params = hooks.params()
        if params is None or not any(params.per_row(site) for site in _SHARED_KEY_SITES):
            return bias(query_layer, key_layer, relative_pos, rel_embeddings, scale_factor)
        scales = [params.scale_at(site, layer) for site in _SHARED_KEY_SITES]
        if all(s is not NotImplemented for s in scales):
            q_scale, k_scale = scales
            B = query_layer.shape[0] // heads

            def by_head(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
                if scale is None:
                    return x
                s = scale.reshape(scale.shape[0], heads, 1, -1).to(x.dtype)  # [B|1, heads, 1, head dim]
                return (x.view(B, heads, *x.shape[1:]) * s).flatten(0, 1)

            with hooks.active(params.without(_SHARED_KEY_SITES)):
                return bias(by_head(query_layer, k_scale), by_head(key_layer, q_scale), relative_pos,
                            rel_embeddings, scale_factor)
        return _per_task(bias, hooks, heads, params, query_layer, key_layer, relative_pos, rel_embeddings,
                         scale_factor)

    return run


def _per_task(bias: Any, hooks: Any, heads: int, params: Any, query_layer: torch.Tensor, key_layer: torch.Tensor,
              relative_pos: Any, rel_embeddings: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """The position bias once per task of the chunk, each with that task's parameters."""
    groups = params.task_groups()
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
)
