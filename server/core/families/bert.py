"""BERT and its relatives with BERT's module names (RoBERTa, XLM-R, CamemBERT, ELECTRA)."""

from switchboard.server.core.families.base import Family, SiteRef, offset_positions

_L = "encoder.layer"
BERT = Family(
    name="bert",
    model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra"),
    sites={
        "q_out": SiteRef(_L, "attention.self.query", "out"),
        "k_out": SiteRef(_L, "attention.self.key", "out"),
        "v_out": SiteRef(_L, "attention.self.value", "out"),
        "attn_out_in": SiteRef(_L, "attention.output.dense", "in"),
        "attn_out": SiteRef(_L, "attention.output.dense", "out"),
        "attn_norm": SiteRef(_L, "attention.output.LayerNorm", "norm"),
        "ffn_int_out": SiteRef(_L, "intermediate.dense", "out"),
        "ffn_out_in": SiteRef(_L, "output.dense", "in"),
        "ffn_out": SiteRef(_L, "output.dense", "out"),
        "ffn_norm": SiteRef(_L, "output.LayerNorm", "norm"),
    },
    pooling="cls",
    functional=True,
    position_limit=lambda cfg: cfg.max_position_embeddings if cfg.model_type in ("bert", "electra")
    else offset_positions(cfg),
)
