"""Houlsby adapters as a tuner kind: pools by (width, activation); few tasks in a chunk run as segments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.core.tuners.base import (
    AdapterValidationError,
    Component,
    GatherContext,
    Pool,
    PoolKey,
    TunerKind,
)
from switchboard.server.core.tuners.houlsby.config import SUBLAYERS, HoulsbyWeights, canonical_activation
from switchboard.server.core.tuners.houlsby.layer import HoulsbyGroup, HoulsbyParams

_NAMES = ("down_w", "down_b", "up_w", "up_b")


class HoulsbyKind(TunerKind[HoulsbyWeights, HoulsbyParams]):
    name = "houlsby"
    is_adapter = True

    def tensors(self, weights: HoulsbyWeights) -> dict[str, torch.Tensor]:
        return {"down_w": weights.down_w, "down_b": weights.down_b, "up_w": weights.up_w, "up_b": weights.up_b}

    def metadata(self, weights: HoulsbyWeights) -> dict[str, str]:
        return {"activation": weights.activation}

    def from_tensors(self, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> HoulsbyWeights | None:
        if not tensors:
            return None
        missing = [n for n in _NAMES if n not in tensors]
        if missing:
            raise AdapterValidationError(f"missing tensor(s) {', '.join(f'houlsby.{n}' for n in missing)}")
        parts = {n: tensors.pop(n) for n in _NAMES}
        return HoulsbyWeights(**parts, activation=metadata.get("activation") or "gelu")

    def expected_shapes(self, weights: HoulsbyWeights, spec: BackboneSpec) -> dict[str, tuple[int, ...]]:
        L, d, m, s = spec.num_layers, spec.hidden_size, weights.width, len(SUBLAYERS)
        return {"down_w": (L, s, m, d), "down_b": (L, s, m), "up_w": (L, s, d, m), "up_b": (L, s, d)}

    def validate(self, weights: HoulsbyWeights, spec: BackboneSpec) -> None:
        if spec.sites and not {"attn_out", "ffn_out"} <= set(spec.sites):
            raise AdapterValidationError(f"the {spec.family} family has no sublayer-output sites for Houlsby adapters")
        try:
            weights.activation = canonical_activation(weights.activation)
        except ValueError as exc:
            raise AdapterValidationError(str(exc)) from exc

    def components(self, weights: HoulsbyWeights, spec: BackboneSpec, model: torch.nn.Module) -> list[Component]:
        L, d, m, s = spec.num_layers, spec.hidden_size, weights.width, len(SUBLAYERS)
        return [Component(
            (self.name, m, weights.activation),
            {"down": ((L, s, d, m), 0.0), "down_b": ((L, s, 1, m), 0.0),
             "up": ((L, s, m, d), 0.0), "up_b": ((L, s, 1, d), 0.0)},
            {"down": weights.down_w.transpose(-1, -2), "down_b": weights.down_b,
             "up": weights.up_w.transpose(-1, -2), "up_b": weights.up_b})]

    def gather(self, params: HoulsbyParams | None, key: PoolKey, pool: Pool, slots: torch.Tensor,
               ctx: GatherContext) -> HoulsbyParams:
        params = params or HoulsbyParams()
        activation = str(key[2])
        used_mask = slots > 0
        distinct = torch.unique(slots[used_mask])
        if len(distinct) <= ctx.segment_max_tasks:
            # Segment matmul: one GEMM per task over its rows, weights not copied per row.
            for s in distinct.tolist():
                idx = torch.tensor([s], device=ctx.device)
                params.groups.append(HoulsbyGroup(ctx.used_rows(slots == s), *self._weights(pool, idx), activation))
            return params
        rows = ctx.used_rows(slots)
        s = (slots if rows is None else slots[used_mask]).to(ctx.device, non_blocking=True)
        params.groups.append(HoulsbyGroup(rows, *self._weights(pool, s), activation))
        return params

    @staticmethod
    def _weights(pool: Pool, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(pool.gather(name, slots) for name in ("down", "down_b", "up", "up_b"))

    def single_task(self, weights: HoulsbyWeights) -> HoulsbyParams:
        w = weights
        return HoulsbyParams([HoulsbyGroup(None, w.down_w.transpose(-1, -2)[None], w.down_b[None, :, :, None, :],
                                           w.up_w.transpose(-1, -2)[None], w.up_b[None, :, :, None, :],
                                           w.activation)])

    def new(self, spec: BackboneSpec, model: torch.nn.Module, generator: torch.Generator,
            options: Mapping[str, Any]) -> HoulsbyWeights:
        return HoulsbyWeights.near_identity(spec, int(options.get("width") or 64),
                                            str(options.get("activation") or "gelu"), generator=generator)
