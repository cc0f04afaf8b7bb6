"""Houlsby bottleneck adapters (Houlsby et al. 2019): h + up(f(down(h))) after both sublayers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from switchboard.server.core.backbone import BackboneSpec

# AdapterHub calls SiLU "swish"; both names are accepted and stored as "silu".
ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_tanh", "relu", "silu", "tanh")
# transformers' names: "gelu_new" and "gelu_pytorch_tanh" are the tanh approximation, "gelu_orig" is exact.
ACTIVATION_ALIASES: dict[str, str] = {"swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                                      "gelu_orig": "gelu"}
# Sublayer index: 0 = after the attention output projection, 1 = after the FFN output projection.
SUBLAYERS: tuple[str, ...] = ("attention", "ffn")


def canonical_activation(name: str) -> str:
    name = ACTIVATION_ALIASES.get(name.lower(), name.lower())
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported adapter activation {name!r}; use one of {', '.join(ACTIVATIONS)}")
    return name


@dataclass
class HoulsbyWeights:
    """Weights in torch.nn.Linear layout: down_w [L, 2, m, d], up_w [L, 2, d, m]."""

    down_w: torch.Tensor
    down_b: torch.Tensor
    up_w: torch.Tensor
    up_b: torch.Tensor
    activation: str = "gelu"

    @property
    def width(self) -> int:
        return int(self.down_w.shape[2])

    @classmethod
    def near_identity(cls, spec: BackboneSpec, width: int = 64, activation: str = "gelu",
                      std: float = 1e-2, generator: torch.Generator | None = None) -> HoulsbyWeights:
        """The paper's init: small truncated-normal weights, zero biases, so the adapter starts ≈ identity."""
        shape_l = (spec.num_layers, len(SUBLAYERS))
        d = spec.hidden_size

        def small(*shape: int) -> torch.Tensor:
            w = torch.empty(*shape)
            torch.nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std, generator=generator)
            return w

        return cls(
            down_w=small(*shape_l, width, d),
            down_b=torch.zeros(*shape_l, width),
            up_w=small(*shape_l, d, width),
            up_b=torch.zeros(*shape_l, d),
            activation=canonical_activation(activation),
        )
