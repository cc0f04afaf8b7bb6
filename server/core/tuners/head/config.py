"""Per-task classification head: pooling → optional hidden layer with tanh → linear to the labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# cls: first token's hidden state; mean: mask-weighted mean; pooler: the backbone's frozen pooler
# (dense + tanh on the first token), as BertForSequenceClassification / PEFT heads use; pair: each
# text of a pair mean-pooled on its own and L2-normalised, u and v, then [u; v; |u − v|; u ∗ v]
# (SBERT's classification features, 4 × hidden wide): a pair head starts from the bi-encoder's geometry
# (Σ u ∗ v is the cosine) and the adapter adds what reading both texts together can; last: the last real
# token's hidden state (decoder backbones, whose causal attention gathers the text there).
POOLINGS: tuple[str, ...] = ("cls", "mean", "pooler", "pair", "last")
# the hidden layer's activation: tanh (BERT/RoBERTa/MPNet heads), relu (DistilBERT's pre_classifier),
# gelu (DeBERTa's pooler, ModernBERT's head)
HEAD_ACTIVATIONS: tuple[str, ...] = ("tanh", "relu", "gelu", "gelu_tanh", "silu")


def pooled_width(pooling: str, hidden_size: int) -> int:
    """Width of the features a pooling hands the head."""
    return 4 * hidden_size if pooling == "pair" else hidden_size


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
    activation: str = "tanh"
    # a LayerNorm after the hidden layer (ModernBERT's head: dense → activation → norm); bias may be absent
    norm_w: torch.Tensor | None = None
    norm_b: torch.Tensor | None = None
    norm_eps: float = 1e-5

    @property
    def num_labels(self) -> int:
        return int(self.out_w.shape[0])

    @property
    def has_hidden(self) -> bool:
        return self.hidden_w is not None

    @property
    def has_norm(self) -> bool:
        return self.norm_w is not None
