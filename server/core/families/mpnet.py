"""MPNet (sentence-transformers' all-mpnet-base-v2): relative position bias; transformers runs it eagerly."""

from switchboard.server.core.families.base import Family, SiteRef, offset_positions

_L = "encoder.layer"
MPNET = Family(
    name="mpnet",
    model_types=("mpnet",),
    sites={
        "q_out": SiteRef(_L, "attention.attn.q", "out"),
        "k_out": SiteRef(_L, "attention.attn.k", "out"),
        "v_out": SiteRef(_L, "attention.attn.v", "out"),
        "attn_out_in": SiteRef(_L, "attention.attn.o", "in"),
        "attn_out": SiteRef(_L, "attention.attn.o", "out"),
        "attn_norm": SiteRef(_L, "attention.LayerNorm", "norm"),
        "ffn_int_out": SiteRef(_L, "intermediate.dense", "out"),
        "ffn_out_in": SiteRef(_L, "output.dense", "in"),
        "ffn_out": SiteRef(_L, "output.dense", "out"),
        "ffn_norm": SiteRef(_L, "output.LayerNorm", "norm"),
    },
    pooling="mean",
    attention="eager",
    position_limit=offset_positions,
)
