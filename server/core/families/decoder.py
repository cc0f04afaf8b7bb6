"""Decoder-only models used as encoders (Qwen2/Qwen3/Llama/Mistral): causal attention, last-token pooling
as their embedding models (Qwen3-Embedding) and sequence classifiers (`score` on the last token) do."""

from switchboard.server.core.families.base import Family, SiteRef

_L = "layers"
DECODER = Family(
    name="decoder",
    model_types=("qwen2", "qwen3", "llama", "mistral"),
    sites={
        "q_out": SiteRef(_L, "self_attn.q_proj", "out"),
        "k_out": SiteRef(_L, "self_attn.k_proj", "out"),
        "v_out": SiteRef(_L, "self_attn.v_proj", "out"),
        "attn_out_in": SiteRef(_L, "self_attn.o_proj", "in"),
        "attn_out": SiteRef(_L, "self_attn.o_proj", "out"),
        "ffn_out_in": SiteRef(_L, "mlp.down_proj", "in"),
        "ffn_out": SiteRef(_L, "mlp.down_proj", "out"),
    },
    pooling="last",
    call_kwargs={"use_cache": False},
)
