"""Per-task classification head: pooling → optional hidden layer with tanh → linear to the labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.backbone import BackboneSpec

# cls: first token's hidden state; mean: mask-weighted mean; pooler: the backbone's frozen pooler
# (dense + tanh on the first token), as BertForSequenceClassification / PEFT heads use.
POOLINGS: tuple[str, ...] = ("cls", "mean", "pooler")


@dataclass
class HeadWeights:
    """Linear layout ([out, in]) as in torch / PEFT / AdapterHub files."""

    out_w: torch.Tensor
    out_b: torch.Tensor
    pooling: str = "cls"
    hidden_w: torch.Tensor | None = None
    hidden_b: torch.Tensor | None = None

    @property
    def num_labels(self) -> int:
        return int(self.out_w.shape[0])

    @property
    def has_hidden(self) -> bool:
        return self.hidden_w is not None

    @classmethod
    def new(cls, spec: BackboneSpec, num_labels: int, pooling: str = "mean", hidden: bool = False,
            generator: torch.Generator | None = None) -> "HeadWeights":
        d = spec.hidden_size
        out_w = torch.empty(num_labels, d)
        torch.nn.init.normal_(out_w, std=0.02, generator=generator)
        hidden_w = hidden_b = None
        if hidden:
            hidden_w = torch.empty(d, d)
            torch.nn.init.normal_(hidden_w, std=0.02, generator=generator)
            hidden_b = torch.zeros(d)
        return cls(out_w=out_w, out_b=torch.zeros(num_labels), pooling=pooling,
                   hidden_w=hidden_w, hidden_b=hidden_b)

    def expected_shapes(self, spec: BackboneSpec) -> dict[str, tuple[int, ...]]:
        d, c = spec.hidden_size, self.num_labels
        shapes = {"head.out_w": (c, d), "head.out_b": (c,)}
        if self.has_hidden:
            shapes |= {"head.hidden_w": (d, d), "head.hidden_b": (d,)}
        return shapes

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"head.out_w": self.out_w, "head.out_b": self.out_b}
        if self.hidden_w is not None and self.hidden_b is not None:
            out |= {"head.hidden_w": self.hidden_w, "head.hidden_b": self.hidden_b}
        return out
