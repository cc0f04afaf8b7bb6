"""T5 / T0 / Flan-T5: an encoder-decoder that classifies by rank classification (T-Few): the decoder
scores each answer choice given the input. (IA)3 sites are PEFT's T5 targets (k, v, wo) in both stacks,
the decoder's cross-attention included."""

from switchboard.server.core.families.base import Family, SiteRef

_E, _D = "encoder.block", "decoder.block"
T5 = Family(
    name="t5",
    model_types=("t5", "mt5"),
    sites={
        "q_out": SiteRef(_E, "layer.0.SelfAttention.q", "out"),
        "k_out": SiteRef(_E, "layer.0.SelfAttention.k", "out"),
        "v_out": SiteRef(_E, "layer.0.SelfAttention.v", "out"),
        "attn_out_in": SiteRef(_E, "layer.0.SelfAttention.o", "in"),
        "attn_out": SiteRef(_E, "layer.0.SelfAttention.o", "out"),
        "ffn_out_in": SiteRef(_E, "layer.1.DenseReluDense.wo", "in"),
        "ffn_out": SiteRef(_E, "layer.1.DenseReluDense.wo", "out"),
        "dec_q_out": SiteRef(_D, "layer.0.SelfAttention.q", "out"),
        "dec_k_out": SiteRef(_D, "layer.0.SelfAttention.k", "out"),
        "dec_v_out": SiteRef(_D, "layer.0.SelfAttention.v", "out"),
        "cross_q_out": SiteRef(_D, "layer.1.EncDecAttention.q", "out"),
        "cross_k_out": SiteRef(_D, "layer.1.EncDecAttention.k", "out"),
        "cross_v_out": SiteRef(_D, "layer.1.EncDecAttention.v", "out"),
        "dec_ffn_out_in": SiteRef(_D, "layer.2.DenseReluDense.wo", "in"),
    },
    pooling="choices",
    auto_class="AutoModelForSeq2SeqLM",
    encoder_path="encoder",
    position_limit=lambda cfg: None,
)

# T-Few's (IA)3: PEFT's T5 targets in every stack
TFEW_SITES: tuple[str, ...] = ("k_out", "v_out", "ffn_out_in", "dec_k_out", "dec_v_out", "cross_k_out",
                               "cross_v_out", "dec_ffn_out_in")
