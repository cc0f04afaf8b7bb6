"""(IA)3 scaling vectors (Liu et al. 2022): learned elementwise rescaling, identity = ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from switchboard.server.core.backbone import BackboneSpec

# Where a vector may scale, and whether its length is the hidden or the FFN-intermediate size.
#   k_out / v_out     : output of the attention key / value projections (paper, PEFT, AdapterHub)
#   attn_out_in       : input of the attention output projection (PEFT's "output.dense" match)
#   ffn_int_out       : output of the FFN intermediate projection, before the activation (AdapterHub)
#   ffn_out_in        : input of the FFN output projection, after the activation (paper's l_ff, PEFT)
IA3_SITES: dict[str, str] = {
    "k_out": "hidden",
    "v_out": "hidden",
    "attn_out_in": "hidden",
    "ffn_int_out": "intermediate",
    "ffn_out_in": "intermediate",
}
PAPER_SITES: tuple[str, ...] = ("k_out", "v_out", "ffn_out_in")


def site_dim(site: str, spec: BackboneSpec) -> int:
    return spec.hidden_size if IA3_SITES[site] == "hidden" else spec.intermediate_size


@dataclass
class Ia3Weights:
    """Per-site vectors, each shaped [num_layers, dim]; absent sites are the identity."""

    vectors: dict[str, torch.Tensor]

    @classmethod
    def identity(cls, spec: BackboneSpec, sites: tuple[str, ...] = PAPER_SITES) -> Ia3Weights:
        return cls({s: torch.ones(spec.num_layers, site_dim(s, spec)) for s in sites})
