"""Tiny random backbones and random (non-identity) task adapters for fast tests."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from switchboard.server.core.adapter import TaskAdapter
from switchboard.server.core.backbone import Backbone, BackboneSpec, default_model_path, wrap_model
from switchboard.server.core.tuners.head.config import HeadWeights, pooled_width
from switchboard.server.core.tuners.houlsby.config import HoulsbyWeights
from switchboard.server.core.tuners.ia3.config import IA3_SITES, Ia3Weights
from switchboard.server.core.tuners.layer_norm.config import LayerNormWeights

TINY_CONFIG = dict(vocab_size=30522, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                   intermediate_size=128, max_position_embeddings=128, hidden_act="gelu")


def tiny_backbone(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    model = BertModel(BertConfig(**TINY_CONFIG), add_pooling_layer=True)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    return wrap_model(model, tokenizer, name="tiny-bert", max_length=128)


def random_adapter(spec: BackboneSpec, *, seed: int, kind: str = "ia3", num_labels: int = 3,
                   width: int = 8, activation: str = "gelu", pooling: str = "cls", hidden: bool = False,
                   layer_norm: bool = False, ia3_sites: tuple[str, ...] | None = None,
                   backbone_model: torch.nn.Module | None = None) -> TaskAdapter:
    """Random adapters far from the identity, so a wrong row/task mapping changes the logits."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    L, d = spec.num_layers, spec.hidden_size
    ia3 = houlsby = ln = None
    if kind in ("ia3", "mixed"):
        sites = ia3_sites if ia3_sites is not None else tuple(s for s in IA3_SITES if s in spec.sites)
        ia3 = Ia3Weights({s: 1.0 + rnd(*spec.sites[s]) for s in sites})
    if kind in ("houlsby", "mixed"):
        houlsby = HoulsbyWeights(down_w=rnd(L, 2, width, d), down_b=rnd(L, 2, width, std=0.1),
                                 up_w=rnd(L, 2, d, width), up_b=rnd(L, 2, d, std=0.1), activation=activation)
    if layer_norm:
        assert backbone_model is not None
        base = LayerNormWeights.from_backbone(backbone_model)
        ln = LayerNormWeights(weight=base.weight + rnd(L, 2, d, std=0.1), bias=base.bias + rnd(L, 2, d, std=0.1))
    n = pooled_width(pooling, d)
    head = HeadWeights(out_w=rnd(num_labels, d if hidden else n, std=1.0), out_b=rnd(num_labels, std=0.5),
                       pooling=pooling, hidden_w=rnd(d, n) if hidden else None,
                       hidden_b=rnd(d, std=0.1) if hidden else None)
    parts = {"ia3": ia3, "houlsby": houlsby, "layer_norm": ln, "head": head}
    return TaskAdapter(labels=[f"label{i}" for i in range(num_labels)],
                       parts={name: w for name, w in parts.items() if w is not None})


TEXTS = [
    "library for parsing command line options",
    "A fast, small web server.",
    "fonts",
    "ham radio logging program with a graphical interface and support for many rigs and contest modes",
    "tools for managing git repositories",
    "Scientific plotting package for python; produces publication quality figures in many formats",
    "mail transfer agent",
    "an arcade game with falling blocks",
    "database server (metapackage depending on the latest version)",
    "Video editor",
    "text editor for programmers with syntax highlighting",
    "electronic circuit simulator",
]


# ten task kinds covering every module kind, pooling and head shape
KINDS = [dict(kind="ia3"), dict(kind="houlsby", width=8, activation="relu"), dict(kind="mixed", width=4),
         dict(kind="ia3", pooling="mean", num_labels=5), dict(kind="houlsby", width=16, pooling="pooler"),
         dict(kind="mixed", hidden=True, num_labels=2), dict(kind="ia3", layer_norm=True, num_labels=4),
         dict(kind="houlsby", activation="swish", layer_norm=True), dict(kind="ia3", num_labels=6),
         dict(kind="mixed", activation="tanh", pooling="mean")]


def peft_ia3(base: torch.nn.Module, seed: int, **config_kwargs):  # noqa: ANN201 (a peft.PeftModel)
    """A PEFT (IA)3 sequence classifier on `base` with random vectors far from 1 and a random head."""
    from peft import IA3Config, TaskType, get_peft_model

    model = get_peft_model(base, IA3Config(task_type=TaskType.SEQ_CLS, **config_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=g))
            elif "classifier" in name:
                param.copy_(torch.randn(param.shape, generator=g))
    return model.eval()


# Tiny random configs of every encoder family (core/families/), each small enough for a unit test; the
# MiniLM tokenizer's ids (< 30522) fit every vocabulary.
def family_configs() -> dict[str, object]:
    import transformers as tf

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return {
        "distilbert": tf.DistilBertConfig(vocab_size=30522, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                          max_position_embeddings=128),
        "mpnet": tf.MPNetConfig(vocab_size=30527, max_position_embeddings=130, **small),
        "deberta-v3": tf.DebertaV2Config(vocab_size=30522, max_position_embeddings=128, relative_attention=True,
                                         pos_att_type=["p2c", "c2p"], share_att_key=True, position_buckets=32,
                                         max_relative_positions=-1, norm_rel_ebd="layer_norm",
                                         position_biased_input=False, type_vocab_size=0, **small),
        "modernbert": tf.ModernBertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, intermediate_size=96, max_position_embeddings=256,
                                          pad_token_id=0, bos_token_id=101, eos_token_id=102, cls_token_id=101,
                                          sep_token_id=102, global_attn_every_n_layers=2, local_attention=16),
        "qwen2": tf.Qwen2Config(vocab_size=30522, num_key_value_heads=2, max_position_embeddings=256,
                                pad_token_id=0, **small),
        "qwen3": tf.Qwen3Config(vocab_size=30522, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                                pad_token_id=0, **small),
        "llama": tf.LlamaConfig(vocab_size=30522, num_key_value_heads=2, max_position_embeddings=256,
                                pad_token_id=0, **small),
    }


def family_classifier(name: str, num_labels: int = 3, seed: int = 0):  # noqa: ANN201 (a transformers model)
    """A tiny random *ForSequenceClassification of the family (eval mode, fp32)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = family_configs()[name]
    config.num_labels = num_labels
    return AutoModelForSequenceClassification.from_config(config).eval()


def family_backbone(name: str, seed: int = 0) -> Backbone:
    """A tiny random backbone of the family, wrapped as the server wraps a loaded one."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    return wrap_model(family_classifier(name, seed=seed).base_model, tokenizer, name=f"tiny-{name}", max_length=128)
