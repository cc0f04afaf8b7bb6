"""Answer choices as a readout kind: the T5 family's tasks classify by rank classification."""

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
from switchboard.server.core.tuners.choices.config import (
    MAX_CHOICE_TOKENS,
    MAX_CHOICES,
    MAX_TEMPLATE_TOKENS,
    ChoiceWeights,
)
from switchboard.server.core.tuners.choices.layer import ChoiceGroup, ChoiceParams
from switchboard.server.core.tuners.head.kind import temperature_of


class ChoicesKind(TunerKind[ChoiceWeights, ChoiceParams]):
    name = "choices"
    is_readout = True

    def tensors(self, weights: ChoiceWeights) -> dict[str, torch.Tensor]:
        return {"token_ids": weights.token_ids, "prefix_ids": weights.prefix_ids, "suffix_ids": weights.suffix_ids}

    def metadata(self, weights: ChoiceWeights) -> dict[str, str]:
        return {"temperature": repr(float(weights.temperature))} if weights.temperature != 1.0 else {}

    def from_tensors(self, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> ChoiceWeights | None:
        if "token_ids" not in tensors:
            return None
        none = torch.full((MAX_TEMPLATE_TOKENS,), -1.0)
        return ChoiceWeights(tensors.pop("token_ids"), tensors.pop("prefix_ids", none),
                             tensors.pop("suffix_ids", none.clone()), temperature_of(metadata))

    def expected_shapes(self, weights: ChoiceWeights, spec: BackboneSpec) -> dict[str, tuple[int, ...]]:
        C, Lc = (int(n) for n in weights.token_ids.shape) if weights.token_ids.dim() == 2 else (0, 0)
        return {"token_ids": (C, Lc), "prefix_ids": (MAX_TEMPLATE_TOKENS,), "suffix_ids": (MAX_TEMPLATE_TOKENS,)}

    def validate(self, weights: ChoiceWeights, spec: BackboneSpec) -> None:
        if spec.family != "t5":
            raise AdapterValidationError(f"answer choices need an encoder-decoder (T5) backbone; this one is "
                                         f"{spec.family}: give the task a head")
        ids = weights.token_ids
        if ids.dim() != 2 or not 1 <= ids.shape[0] <= MAX_CHOICES or not 1 <= ids.shape[1] <= MAX_CHOICE_TOKENS:
            raise AdapterValidationError(
                f"choices.token_ids must be [1..{MAX_CHOICES} choices, 1..{MAX_CHOICE_TOKENS} tokens]")
        for name in ("prefix_ids", "suffix_ids"):
            if tuple(getattr(weights, name).shape) != (MAX_TEMPLATE_TOKENS,):
                raise AdapterValidationError(f"choices.{name} must be [{MAX_TEMPLATE_TOKENS}]")
        vocab = spec.vocab_size or (1 << 24)
        for name, t in self.tensors(weights).items():
            if not bool(((t == t.round()) & (t >= -1) & (t < vocab)).all()):
                raise AdapterValidationError(f"choices.{name} must hold token ids in [0, {vocab}) or -1")
        for name, t in (("token_ids", ids), ("prefix_ids", weights.prefix_ids[None]),
                        ("suffix_ids", weights.suffix_ids[None])):
            real = t >= 0
            if bool((real[:, 1:] & ~real[:, :-1]).any()):  # a -1 before a real token
                raise AdapterValidationError(f"choices.{name}: -1 only after a sequence's last token")
        if not bool((ids[:, 0] >= 0).all()):
            raise AdapterValidationError("every answer choice needs at least one token")

    def components(self, weights: ChoiceWeights, spec: BackboneSpec, model: torch.nn.Module) -> list[Component]:
        C, Lc = (int(n) for n in weights.token_ids.shape)
        fields = {"ids": ((C, Lc), -1.0), "prefix": ((MAX_TEMPLATE_TOKENS,), -1.0),
                  "suffix": ((MAX_TEMPLATE_TOKENS,), -1.0)}
        values = {"ids": weights.token_ids, "prefix": weights.prefix_ids, "suffix": weights.suffix_ids}
        return [Component((self.name, C, Lc), fields, values, float32=True)]

    def gather(self, params: ChoiceParams | None, key: PoolKey, pool: Pool, slots: torch.Tensor,
               ctx: GatherContext) -> ChoiceParams:
        params = params or ChoiceParams()
        rows = ctx.used_rows(slots)
        s = (slots if rows is None else slots[slots > 0]).to(ctx.device, non_blocking=True)
        params.groups.append(ChoiceGroup(rows, pool.gather("ids", s), pool.gather("prefix", s),
                                         pool.gather("suffix", s)))
        return params

    def single_task(self, weights: ChoiceWeights) -> ChoiceParams:
        return ChoiceParams([ChoiceGroup(None, weights.token_ids[None], weights.prefix_ids[None],
                                         weights.suffix_ids[None])])

    def new(self, spec: BackboneSpec, model: torch.nn.Module, generator: torch.Generator,
            options: Mapping[str, Any]) -> ChoiceWeights:
        """Options: choices (a ChoiceWeights built by `choices_from_text` with the backbone's tokenizer)."""
        choices = options.get("choices")
        if not isinstance(choices, ChoiceWeights):
            raise ValueError("a rank-classification task needs its answer choices (option 'choices')")
        return choices
