"""(IA)3 scaling vectors (Liu et al. 2022): learned elementwise rescaling, identity = ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.core.families import ALL_SITES

# The sites a vector may scale on BERT (other families: their site maps, core/families/):
#   q_out / k_out / v_out : output of the attention query / key / value projections (paper, PEFT)
#   attn_out_in       : input of the attention output projection (PEFT's "output.dense" match)
#   ffn_int_out       : output of the FFN intermediate projection, before the activation (AdapterHub)
#   ffn_out_in        : input of the FFN output projection, after the activation (paper's l_ff, PEFT)
IA3_SITES: tuple[str, ...] = ("k_out", "v_out", "attn_out_in", "ffn_int_out", "ffn_out_in")
PAPER_SITES: tuple[str, ...] = ("k_out", "v_out", "ffn_out_in")
# every site a vector may scale on some family (LayerNorm sites excepted): the names file tensors may carry
VECTOR_SITES: tuple[str, ...] = tuple(s for s in ALL_SITES if not s.endswith("_norm"))


def site_dim(site: str, spec: BackboneSpec) -> int:
    return spec.site_dim(site)


@dataclass
class Ia3Weights:
    """Per-site vectors, each shaped [num_layers, dim]; absent sites are the identity."""

    vectors: dict[str, torch.Tensor]

    @classmethod
    def identity(cls, spec: BackboneSpec, sites: tuple[str, ...] = PAPER_SITES) -> Ia3Weights:
        return cls({s: torch.ones(*spec.sites[s]) for s in sites})
