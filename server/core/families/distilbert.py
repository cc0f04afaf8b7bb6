"""DistilBERT: BERT's layer under other names, no token types."""

from switchboard.server.core.families.base import Family, SiteRef

_L = "transformer.layer"
DISTILBERT = Family(
    name="distilbert",
    model_types=("distilbert",),
    sites={
        "q_out": SiteRef(_L, "attention.q_lin", "out"),
        "k_out": SiteRef(_L, "attention.k_lin", "out"),
        "v_out": SiteRef(_L, "attention.v_lin", "out"),
        "attn_out_in": SiteRef(_L, "attention.out_lin", "in"),
        "attn_out": SiteRef(_L, "attention.out_lin", "out"),
        "attn_norm": SiteRef(_L, "sa_layer_norm", "norm"),
        "ffn_int_out": SiteRef(_L, "ffn.lin1", "out"),
        "ffn_out_in": SiteRef(_L, "ffn.lin2", "in"),
        "ffn_out": SiteRef(_L, "ffn.lin2", "out"),
        "ffn_norm": SiteRef(_L, "output_layer_norm", "norm"),
    },
    pooling="cls",
)
