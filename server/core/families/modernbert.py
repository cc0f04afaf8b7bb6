"""ModernBERT: pre-norm layers, a fused Wqkv (q, k, v are its thirds), a GLU feed-forward."""

from switchboard.server.core.families.base import Family, SiteRef

_L = "layers"
MODERNBERT = Family(
    name="modernbert",
    model_types=("modernbert",),
    sites={
        "qkv_out": SiteRef(_L, "attn.Wqkv", "out"),  # PEFT's target: the whole fused output
        "q_out": SiteRef(_L, "attn.Wqkv", "out", (0, 3)),
        "k_out": SiteRef(_L, "attn.Wqkv", "out", (1, 3)),
        "v_out": SiteRef(_L, "attn.Wqkv", "out", (2, 3)),
        "attn_out_in": SiteRef(_L, "attn.Wo", "in"),
        "attn_out": SiteRef(_L, "attn.Wo", "out"),
        "ffn_out_in": SiteRef(_L, "mlp.Wo", "in"),
        "ffn_out": SiteRef(_L, "mlp.Wo", "out"),
    },
    pooling="cls",
)
