"""The classification head as a tuner kind: every task has one; pools by (pooling, labels, hidden)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.core.tuners.base import (
    AdapterValidationError,
    Component,
    Fields,
    GatherContext,
    Pool,
    PoolKey,
    TunerKind,
)
from switchboard.server.core.tuners.head.config import HEAD_ACTIVATIONS, POOLINGS, HeadWeights, pooled_width
from switchboard.server.core.tuners.head.layer import HeadGroup, HeadParams


class HeadKind(TunerKind[HeadWeights, HeadParams]):
    name = "head"
    is_readout = True

    def tensors(self, weights: HeadWeights) -> dict[str, torch.Tensor]:
        out = {"out_w": weights.out_w, "out_b": weights.out_b}
        if weights.hidden_w is not None and weights.hidden_b is not None:
            out |= {"hidden_w": weights.hidden_w, "hidden_b": weights.hidden_b}
        if weights.norm_w is not None and weights.norm_b is not None:
            out |= {"norm_w": weights.norm_w, "norm_b": weights.norm_b}
        return out

    def metadata(self, weights: HeadWeights) -> dict[str, str]:
        settings = {"pooling": weights.pooling, "head_hidden": "true" if weights.has_hidden else "false"}
        if weights.temperature != 1.0:
            settings["temperature"] = repr(float(weights.temperature))
        if weights.activation != "tanh":
            settings["head_activation"] = weights.activation
        if weights.has_norm:
            settings["head_norm_eps"] = repr(float(weights.norm_eps))
        return settings

    def from_tensors(self, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> HeadWeights | None:
        if not tensors.keys() & {"out_w", "out_b", "hidden_w", "hidden_b"}:
            return None  # a task whose readout is another kind (T5 answer choices)
        for name in ("out_w", "out_b"):
            if name not in tensors:
                raise AdapterValidationError(f"missing tensor head.{name}")
        return HeadWeights(out_w=tensors.pop("out_w"), out_b=tensors.pop("out_b"),
                           pooling=metadata.get("pooling", "cls"), temperature=temperature_of(metadata),
                           hidden_w=tensors.pop("hidden_w", None), hidden_b=tensors.pop("hidden_b", None),
                           activation=metadata.get("head_activation", "tanh")[:40],
                           norm_w=tensors.pop("norm_w", None), norm_b=tensors.pop("norm_b", None),
                           norm_eps=_norm_eps(metadata))

    def expected_shapes(self, weights: HeadWeights, spec: BackboneSpec) -> dict[str, tuple[int, ...]]:
        d, c, n = spec.hidden_size, weights.num_labels, pooled_width(weights.pooling, spec.hidden_size)
        norm = {"norm_w": (d,), "norm_b": (d,)} if weights.has_norm else {}
        if weights.has_hidden:
            return {"hidden_w": (d, n), "hidden_b": (d,), "out_w": (c, d), "out_b": (c,)} | norm
        return {"out_w": (c, n), "out_b": (c,)}

    def validate(self, weights: HeadWeights, spec: BackboneSpec) -> None:
        if weights.out_w.dim() != 2 or weights.out_b.dim() != 1:
            raise AdapterValidationError("head.out_w must be 2-D [labels, hidden] and head.out_b 1-D")
        if weights.pooling not in POOLINGS:
            raise AdapterValidationError(f"unknown pooling {weights.pooling!r}; use one of {POOLINGS}")
        if weights.pooling == "pooler" and not spec.has_pooler:
            raise AdapterValidationError("head pooling 'pooler' needs a backbone pooler; this backbone has none")
        if weights.num_labels < 1:
            raise AdapterValidationError("the head has no labels")
        if (weights.hidden_w is None) != (weights.hidden_b is None):
            raise AdapterValidationError("head hidden layer needs both weight and bias")
        if weights.activation not in HEAD_ACTIVATIONS:
            raise AdapterValidationError(
                f"unknown head activation {weights.activation!r}; use one of {HEAD_ACTIVATIONS}")
        if (weights.norm_w is None) != (weights.norm_b is None) or (weights.has_norm and not weights.has_hidden):
            raise AdapterValidationError("a head norm needs both norm_w and norm_b, after a hidden layer")

    def components(self, weights: HeadWeights, spec: BackboneSpec, model: torch.nn.Module) -> list[Component]:
        d, c, n = spec.hidden_size, weights.num_labels, pooled_width(weights.pooling, spec.hidden_size)
        fields: Fields = {"out_w": ((d if weights.has_hidden else n, c), 0.0), "out_b": ((1, c), 0.0)}
        values = {"out_w": weights.out_w.t(), "out_b": weights.out_b}
        if weights.hidden_w is not None and weights.hidden_b is not None:
            fields |= {"hidden_w": ((n, d), 0.0), "hidden_b": ((1, d), 0.0)}
            values |= {"hidden_w": weights.hidden_w.t(), "hidden_b": weights.hidden_b}
        if weights.norm_w is not None and weights.norm_b is not None:
            fields |= {"norm_w": ((1, d), 1.0), "norm_b": ((1, d), 0.0)}
            values |= {"norm_w": weights.norm_w, "norm_b": weights.norm_b}
        norm_eps = weights.norm_eps if weights.has_norm else 0.0  # 0.0: no norm
        key = (self.name, weights.pooling, c, weights.has_hidden, weights.activation, norm_eps)
        return [Component(key, fields, values, float32=True)]

    def gather(self, params: HeadParams | None, key: PoolKey, pool: Pool, slots: torch.Tensor,
               ctx: GatherContext) -> HeadParams:
        params = params or HeadParams()
        rows = ctx.used_rows(slots)
        s = (slots if rows is None else slots[slots > 0]).to(ctx.device, non_blocking=True)
        hidden, norm_eps = bool(key[3]), key[5]
        params.groups.append(HeadGroup(
            rows=rows, pooling=str(key[1]), out_w=pool.gather("out_w", s), out_b=pool.gather("out_b", s),
            hidden_w=pool.gather("hidden_w", s) if hidden else None,
            hidden_b=pool.gather("hidden_b", s) if hidden else None, activation=str(key[4]),
            norm_w=pool.gather("norm_w", s) if norm_eps else None,
            norm_b=pool.gather("norm_b", s) if norm_eps else None, norm_eps=float(norm_eps or 1e-5)))
        return params

    def single_task(self, weights: HeadWeights) -> HeadParams:
        w = weights
        return HeadParams([HeadGroup(None, w.pooling, w.out_w.t()[None], w.out_b[None, None],
                                     None if w.hidden_w is None else w.hidden_w.t()[None],
                                     None if w.hidden_b is None else w.hidden_b[None, None], w.activation,
                                     None if w.norm_w is None else w.norm_w[None, None],
                                     None if w.norm_b is None else w.norm_b[None, None], w.norm_eps)])

    def new(self, spec: BackboneSpec, model: torch.nn.Module, generator: torch.Generator,
            options: Mapping[str, Any]) -> HeadWeights:
        """Options: num_labels (required), pooling (default mean; a decoder backbone's: last), head_hidden
        (default off)."""
        pooling = str(options.get("pooling") or ("last" if spec.pooling == "last" else "mean"))
        d, c, n = spec.hidden_size, int(options["num_labels"]), pooled_width(pooling, spec.hidden_size)
        out_w = torch.empty(c, d if options.get("head_hidden") else n)
        torch.nn.init.normal_(out_w, std=0.02, generator=generator)
        hidden_w = hidden_b = None
        if options.get("head_hidden"):
            hidden_w = torch.empty(d, n)
            torch.nn.init.normal_(hidden_w, std=0.02, generator=generator)
            hidden_b = torch.zeros(d)
        return HeadWeights(out_w=out_w, out_b=torch.zeros(c), pooling=pooling, hidden_w=hidden_w, hidden_b=hidden_b)


MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0  # a fitted temperature lands well inside; past these is a broken file


def _bounded_float(metadata: Mapping[str, str], name: str, default: str, low: float, high: float) -> float:
    """A numeric setting from file metadata, within [low, high] (which also refuses nan and ±inf)."""
    text = metadata.get(name, default)
    try:
        value = float(text[:40])
    except ValueError:
        raise AdapterValidationError(f"metadata {name!r} is not a number: {text[:40]!r}") from None
    if not low <= value <= high:
        raise AdapterValidationError(f"metadata {name!r} {value} is outside [{low}, {high}]")
    return value


def _norm_eps(metadata: Mapping[str, str]) -> float:
    return _bounded_float(metadata, "head_norm_eps", "1e-5", 1e-12, 0.1)


def temperature_of(metadata: Mapping[str, str]) -> float:
    """A readout's calibration temperature from file metadata, within bounds."""
    return _bounded_float(metadata, "temperature", "1.0", MIN_TEMPERATURE, MAX_TEMPERATURE)
