"""A backbone family is a site map: where in the Hugging Face module tree each site is.

PEFT maps `target_modules` per model type; a family does the same for every site a tuner kind may act
on (`tuners/base.py`), so the forward of every family is Hugging Face's own, with per-row task
parameters applied at those modules by hooks (`core/site_hooks.py`). BERT's layer also has a
functional fast path (`forward.py`), measured to win on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Where = Literal["out", "in", "norm"]


@dataclass(frozen=True)
class SiteRef:
    """One site: the module at `path` inside each layer of the list at `stack`.

    where: "out" transforms the module's output, "in" its input (PEFT's feed-forward (IA)3), "norm"
    replaces a post-sublayer LayerNorm (the input is the pre-norm sum). part (i, n): the i-th of n equal
    slices of a fused projection's output (ModernBERT's Wqkv holds q, k and v).
    """

    stack: str
    path: str
    where: Where
    part: tuple[int, int] | None = None


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    sites: Mapping[str, SiteRef]
    pooling: str  # the pooling its own embedding / classification models use
    auto_class: str = "AutoModel"  # the transformers class the backbone is loaded with
    attention: str = "sdpa"  # "eager" where transformers has no sdpa path for the family
    # the module whose forward is the encoder (T5: "encoder" of the seq2seq model); "" = the model
    encoder_path: str = ""
    # positions the model can embed, from its config (None: relative positions, no table)
    position_limit: Callable[[Any], int | None] = lambda cfg: cfg.max_position_embeddings
    # extra per-model wiring a family needs besides the site hooks (DeBERTa's relative keys)
    install: Callable[[torch.nn.Module, Any], None] | None = None
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra arguments of the encoder's forward
    # runs forward.py's functional layer instead of Hugging Face's forward with site hooks (BERT: measured
    # faster on the CPU); such a model gets no hooks
    functional: bool = False

    @property
    def stacks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(ref.stack for ref in self.sites.values()))

    def site_shapes(self, model: torch.nn.Module) -> dict[str, tuple[int, int]]:
        """site → (layers, vector length) for this model's sizes."""
        shapes: dict[str, tuple[int, int]] = {}
        for site, ref in self.sites.items():
            layers = model.get_submodule(ref.stack)
            module = layers[0].get_submodule(ref.path)
            if ref.where == "norm":
                dim = int(module.normalized_shape[0])
            elif ref.where == "in":
                dim = int(module.in_features)
            else:
                dim = int(module.out_features) // (ref.part[1] if ref.part else 1)
            shapes[site] = (len(layers), dim)
        return shapes

    def encoder(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.get_submodule(self.encoder_path) if self.encoder_path else model


def offset_positions(cfg: Any) -> int:
    """RoBERTa-style position ids start after the padding index."""
    return int(cfg.max_position_embeddings) - (int(cfg.pad_token_id) + 1)
