"""Per-task LayerNorm as a tuner kind: one pool whose identity is the backbone's own LayerNorms."""

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
from switchboard.server.core.tuners.layer_norm.config import LayerNormWeights
from switchboard.server.core.tuners.layer_norm.layer import LayerNormParams


class LayerNormKind(TunerKind[LayerNormWeights, LayerNormParams]):
    name = "layer_norm"

    def tensors(self, weights: LayerNormWeights) -> dict[str, torch.Tensor]:
        return {"weight": weights.weight, "bias": weights.bias}

    def from_tensors(self, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> LayerNormWeights | None:
        if not tensors:
            return None
        if "weight" not in tensors or "bias" not in tensors:
            raise AdapterValidationError("layer_norm needs both layer_norm.weight and layer_norm.bias")
        return LayerNormWeights(weight=tensors.pop("weight"), bias=tensors.pop("bias"))

    def validate(self, weights: LayerNormWeights, spec: BackboneSpec) -> None:
        if spec.sites and not {"attn_norm", "ffn_norm"} <= set(spec.sites):
            raise AdapterValidationError(
                f"the {spec.family} family normalises before each sublayer (pre-norm): it has no post-sublayer "
                "LayerNorms for a layer_norm part to replace")

    def expected_shapes(self, weights: LayerNormWeights, spec: BackboneSpec) -> dict[str, tuple[int, ...]]:
        shape = (spec.num_layers, 2, spec.hidden_size)
        return {"weight": shape, "bias": shape}

    def components(self, weights: LayerNormWeights, spec: BackboneSpec, model: torch.nn.Module) -> list[Component]:
        L, d = spec.num_layers, spec.hidden_size
        base = LayerNormWeights.from_backbone(model)
        return [Component((self.name,),
                          {"weight": ((L, 2, 1, d), base.weight), "bias": ((L, 2, 1, d), base.bias)},
                          {"weight": weights.weight, "bias": weights.bias}, float32=True)]

    def gather(self, params: LayerNormParams | None, key: PoolKey, pool: Pool, slots: torch.Tensor,
               ctx: GatherContext) -> LayerNormParams:
        s = slots.to(ctx.device, non_blocking=True)
        return LayerNormParams(pool.gather("weight", s), pool.gather("bias", s))

    def single_task(self, weights: LayerNormWeights) -> LayerNormParams:
        return LayerNormParams(weights.weight[None, :, :, None, :], weights.bias[None, :, :, None, :])

    def new(self, spec: BackboneSpec, model: torch.nn.Module, generator: torch.Generator,
            options: Mapping[str, Any]) -> LayerNormWeights:
        return LayerNormWeights.from_backbone(model)
