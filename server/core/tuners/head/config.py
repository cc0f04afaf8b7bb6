"""Per-task classification head: pooling → optional hidden layer with tanh → linear to the labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    # probabilities are softmax(logits / temperature): fitted on the eval split after training
    # (calibration); raw scores stay the logits themselves
    temperature: float = 1.0

    @property
    def num_labels(self) -> int:
        return int(self.out_w.shape[0])

    @property
    def has_hidden(self) -> bool:
        return self.hidden_w is not None
