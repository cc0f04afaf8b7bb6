"""Embeddings from the same backbone, in the same batches as classification.

A built-in task whose head is the identity on mean pooling: its "logits" are the frozen backbone's
mean-pooled embeddings (what sentence-transformers computes for MiniLM, before normalisation). It is
loaded once at start-up, never evicted, and rides in mixed batches like any task — no second code path.
"""

from __future__ import annotations

import torch

from switchboard.server.core.adapter import TaskAdapter
from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.core.tuners.head.config import HeadWeights
from switchboard.server.runtime.lease import FixedSlot, Lease


def identity_head(spec: BackboneSpec) -> TaskAdapter:
    d = spec.hidden_size
    # mean pooling as sentence-transformers' models do; a decoder's last token as Qwen3-Embedding does
    head = HeadWeights(out_w=torch.eye(d), out_b=torch.zeros(d), pooling="last" if spec.pooling == "last" else "mean")
    return TaskAdapter(labels=[str(i) for i in range(d)], parts={"head": head})


class Embeddings:
    def __init__(self, engine) -> None:  # noqa: ANN001 - Engine or ProcessEngine
        """Loads the identity head into the engine (hidden² floats, outside the adapters' slot budget)."""
        self.dim = engine.spec.hidden_size
        self._pinned = FixedSlot(engine.load(identity_head(engine.spec), outside_budget=True).slot)

    def lease(self) -> Lease:
        """A lease on the built-in slot: releasing it is a no-op (it is never unloaded)."""
        return Lease(self._pinned, lambda _: None)
