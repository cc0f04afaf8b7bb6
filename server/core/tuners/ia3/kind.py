"""(IA)3 as a tuner kind: one pool per site, vectors gathered per row (or once per single-task chunk)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.core.families.t5 import TFEW_SITES
from switchboard.server.core.tuners.base import (
    AdapterValidationError,
    Component,
    GatherContext,
    Pool,
    PoolKey,
    TunerKind,
)
from switchboard.server.core.tuners.ia3.config import PAPER_SITES, VECTOR_SITES, Ia3Weights
from switchboard.server.core.tuners.ia3.layer import Ia3Params


class Ia3Kind(TunerKind[Ia3Weights, Ia3Params]):
    name = "ia3"
    is_adapter = True

    def tensors(self, weights: Ia3Weights) -> dict[str, torch.Tensor]:
        return dict(weights.vectors)

    def from_tensors(self, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> Ia3Weights | None:
        vectors = {site: tensors.pop(site) for site in VECTOR_SITES if site in tensors}
        return Ia3Weights(vectors) if vectors else None

    def expected_shapes(self, weights: Ia3Weights, spec: BackboneSpec) -> dict[str, tuple[int, ...]]:
        return {s: tuple(spec.sites[s]) for s in weights.vectors if s in spec.sites}

    def validate(self, weights: Ia3Weights, spec: BackboneSpec) -> None:
        unknown = [s for s in weights.vectors if s not in spec.sites or s.endswith("_norm")]
        if unknown:
            raise AdapterValidationError(
                f"(IA)3 site(s) {sorted(unknown)} do not exist on this {spec.family} backbone; its sites: "
                f"{', '.join(s for s in spec.sites if not s.endswith('_norm'))}")

    def components(self, weights: Ia3Weights, spec: BackboneSpec, model: torch.nn.Module) -> list[Component]:
        return [Component((self.name, site), {"v": ((spec.site_layers(site), 1, spec.site_dim(site)), 1.0)},
                          {"v": vec}) for site, vec in weights.vectors.items()]

    def gather(self, params: Ia3Params | None, key: PoolKey, pool: Pool, slots: torch.Tensor,
               ctx: GatherContext) -> Ia3Params:
        params = params or Ia3Params()
        # One slot for the whole chunk is gathered once and broadcast; rows of other tasks gather
        # slot 0, the ones vector, so the product is exact.
        first = slots[:1]
        one = bool((slots == first).all())
        params.vectors[str(key[1])] = pool.gather("v", (first if one else slots).to(ctx.device, non_blocking=True))
        return params

    def single_task(self, weights: Ia3Weights) -> Ia3Params:
        return Ia3Params({site: v[None, :, None, :] for site, v in weights.vectors.items()})

    def new(self, spec: BackboneSpec, model: torch.nn.Module, generator: torch.Generator,
            options: Mapping[str, Any]) -> Ia3Weights:
        """Ones: the paper's init, an exact identity (T5: T-Few's sites in both stacks)."""
        default = tuple(s for s in (TFEW_SITES if spec.family == "t5" else PAPER_SITES) if s in spec.sites)
        sites = tuple(options.get("ia3_sites") or default)
        unknown = [s for s in sites if s not in spec.sites or s.endswith("_norm")]
        if unknown:
            raise ValueError(f"(IA)3 site(s) {unknown} do not exist on this {spec.family} backbone; its sites: "
                             f"{', '.join(s for s in spec.sites if not s.endswith('_norm'))}")
        return Ia3Weights.identity(spec, sites)
