"""Deterministic bench adapters shared by our server, the PEFT baseline server and the engine bench."""

from __future__ import annotations

import torch

from switchboard.server.core.adapter import TaskAdapter
from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.core.tuners.head.config import HeadWeights, pooled_width
from switchboard.server.core.tuners.houlsby.config import HoulsbyWeights
from switchboard.server.core.tuners.ia3.config import Ia3Weights, site_dim

# PEFT's default (IA)3 targets on BERT: key, value (output scaling) and both `output.dense`
# modules (input scaling), i.e. our k_out, v_out, attn_out_in, ffn_out_in.
PEFT_BERT_SITES = ("k_out", "v_out", "attn_out_in", "ffn_out_in")


def bench_adapter(spec: BackboneSpec, kind: str, seed: int, width: int = 64, num_labels: int = 8,
                  sites: tuple[str, ...] = ("k_out", "v_out", "ffn_out_in"), pooling: str = "mean") -> TaskAdapter:
    """Adapters with trained-like magnitudes (not the identity) so no work can be skipped."""
    g = torch.Generator().manual_seed(seed)
    L, d = spec.num_layers, spec.hidden_size
    ia3 = houlsby = None
    if kind == "ia3":
        ia3 = Ia3Weights({s: 1.0 + 0.1 * torch.randn(L, site_dim(s, spec), generator=g) for s in sites})
    else:
        houlsby = HoulsbyWeights(down_w=0.02 * torch.randn(L, 2, width, d, generator=g),
                                 down_b=torch.zeros(L, 2, width),
                                 up_w=0.02 * torch.randn(L, 2, d, width, generator=g),
                                 up_b=torch.zeros(L, 2, d), activation="gelu")
    head = HeadWeights(out_w=0.3 * torch.randn(num_labels, pooled_width(pooling, d), generator=g),
                       out_b=torch.zeros(num_labels), pooling=pooling)
    parts = {name: w for name, w in (("ia3", ia3), ("houlsby", houlsby), ("head", head)) if w is not None}
    return TaskAdapter(labels=[f"l{i}" for i in range(num_labels)], parts=parts)
