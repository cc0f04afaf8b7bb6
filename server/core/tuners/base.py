"""The one interface every per-task module kind implements (PEFT's `tuners/<method>/` idea).

A kind owns, in its own folder: its weights and their shapes (`config.py`), its compute for a batch of
rows (`layer.py`), and this interface (`kind.py`): how its weights are serialised, validated and
initialised, which slot-pool fields it needs, how a chunk's rows gather from those pools, and where
in the encoder its gathered parameters apply. The engine, the native file format, the forward and the
trainer only iterate over the registered kinds (`tuners/__init__.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch

from switchboard.server.core.backbone import BackboneSpec

# Where a kind may act inside one layer is named by a site; each backbone family maps the sites it has
# to its modules (core/families/: q_out, k_out, v_out, attn_out_in, attn_out, attn_norm, ffn_int_out,
# ffn_out_in, ffn_out, ffn_norm, and T5's decoder sites). `*_norm` sites replace the sublayer's
# LayerNorm (the input is the pre-norm sum); every other site transforms a tensor.
NORM_SITES: frozenset[str] = frozenset({"attn_norm", "ffn_norm"})

# pool field name → (shape of one slot, identity fill: a scalar or a tensor of that shape)
Fields = dict[str, tuple[tuple[int, ...], float | torch.Tensor]]
PoolKey = tuple[object, ...]  # (kind name, *shape key): tasks of equal shape share a pool


class AdapterValidationError(ValueError):
    """The adapter does not fit the backbone or is malformed; the message names the first problem."""


@dataclass(frozen=True)
class Component:
    """One task's share of one slot pool."""

    key: PoolKey
    fields: Fields
    values: dict[str, torch.Tensor]
    float32: bool = False  # pooled in float32 whatever the compute dtype (tiny, and sets precision)


class Pool(Protocol):
    def gather(self, name: str, slots: torch.Tensor) -> torch.Tensor: ...


class GatherContext(Protocol):
    """What a kind needs from the engine while gathering a chunk's rows."""

    device: torch.device
    segment_max_tasks: int

    def used_rows(self, pool_slots: torch.Tensor) -> torch.Tensor | None:
        """Row indices whose pool slot is not the identity (None = every row), on the device."""
        ...


class SiteParams(ABC):
    """One kind's parameters for the rows of one forward: gathered per row, or one task broadcast."""

    @property
    @abstractmethod
    def sites(self) -> frozenset[str]:
        """The sites this instance acts on."""

    @abstractmethod
    def apply(self, site: str, x: torch.Tensor, layer: int, module: torch.nn.Module) -> torch.Tensor:
        """x at `site` of encoder layer `layer`; `module` is the backbone module there (Linear or LayerNorm)."""

    def per_row(self, site: str) -> bool:
        """Whether rows may carry different parameters at `site` (False: one task broadcast)."""
        return True

    def scale(self, site: str, layer: int) -> torch.Tensor:
        """Each row's elementwise scale at `site` [B|1, dim] if that is all this kind does there, else
        NotImplemented (a family may then move the scale to an equivalent place)."""
        return NotImplemented

    def without(self, sites: tuple[str, ...]) -> SiteParams:
        """These parameters acting nowhere in `sites` (only for kinds whose action there is a scale)."""
        if self.sites & set(sites):
            raise NotImplementedError(f"{type(self).__name__} cannot drop sites")
        return self

    def rows(self, index: torch.Tensor) -> SiteParams:
        """These rows' parameters only (for a family that must run a piece of its layer per task)."""
        raise NotImplementedError(f"{type(self).__name__} cannot select rows")


class Readout(ABC):
    """The kind that turns hidden states into logits (the head): exactly one per task."""

    def prepare_inputs(self, input_ids: torch.Tensor, segments: torch.Tensor,
                       pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's input ids and segment mask for these rows (a rank-classification task wraps its
        prompt template around the text); the same tensors when nothing changes."""
        return input_ids, segments

    @abstractmethod
    def logits(self, model: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, C_max] float32, -inf past each row's label count."""


W = TypeVar("W")
P = TypeVar("P")


class TunerKind(ABC, Generic[W, P]):
    """Everything about one kind of per-task module. Tensor names in files are `<name>.<tensor>`."""

    name: ClassVar[str]
    is_adapter: ClassVar[bool] = False  # counts towards a task's kind label: "ia3", "houlsby", "mixed"
    is_readout: ClassVar[bool] = False

    # ----- the file -------------------------------------------------------------------------------
    @abstractmethod
    def tensors(self, weights: W) -> dict[str, torch.Tensor]:
        """Tensor name (without the kind prefix) → tensor; the trainer optimises these very tensors."""

    def metadata(self, weights: W) -> dict[str, str]:
        """String settings stored in the native file's `__metadata__` (they change the output)."""
        return {}

    @abstractmethod
    def from_tensors(self, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> W | None:
        """Take (pop) this kind's tensors (float32, prefix removed); None if the file has none of them."""

    # ----- validation -----------------------------------------------------------------------------
    @abstractmethod
    def expected_shapes(self, weights: W, spec: BackboneSpec) -> dict[str, tuple[int, ...]]:
        """Tensor name → the shape this backbone needs (checked for every tensor before loading)."""

    def validate(self, weights: W, spec: BackboneSpec) -> None:
        """Semantic checks beyond shapes and finiteness; raises AdapterValidationError."""

    # ----- the engine -----------------------------------------------------------------------------
    @abstractmethod
    def components(self, weights: W, spec: BackboneSpec, model: torch.nn.Module) -> list[Component]:
        """The slot pools this task occupies and its values in each."""

    @abstractmethod
    def gather(self, params: P | None, key: PoolKey, pool: Pool, slots: torch.Tensor,
               ctx: GatherContext) -> P:
        """Add the rows of one pool to this kind's params for a chunk. slots: [B] pool slot per row
        (0 = identity), on the CPU."""

    # ----- training -------------------------------------------------------------------------------
    @abstractmethod
    def single_task(self, weights: W) -> P:
        """One task's parameters with a leading dim of 1, broadcast over the batch (differentiable)."""

    @abstractmethod
    def new(self, spec: BackboneSpec, model: torch.nn.Module, generator: torch.Generator,
            options: Mapping[str, Any]) -> W:
        """Fresh weights to train, from the recipe's options (unknown options are ignored)."""
