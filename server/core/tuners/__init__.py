"""Per-task module kinds, one folder per method; this tuple is their one registration.

Order is the order of application where two kinds share a site (none do today) and the order of
tensors in files. Exactly one kind is the readout (the head).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from switchboard.server.core.tuners.base import AdapterValidationError, TunerKind
from switchboard.server.core.tuners.head.kind import HeadKind
from switchboard.server.core.tuners.houlsby.kind import HoulsbyKind
from switchboard.server.core.tuners.ia3.kind import Ia3Kind
from switchboard.server.core.tuners.layer_norm.kind import LayerNormKind

KINDS: tuple[TunerKind, ...] = (Ia3Kind(), HoulsbyKind(), LayerNormKind(), HeadKind())
KINDS_BY_NAME: Mapping[str, TunerKind] = MappingProxyType({kind.name: kind for kind in KINDS})
READOUT: str = next(kind.name for kind in KINDS if kind.is_readout)

__all__ = ["KINDS", "KINDS_BY_NAME", "READOUT", "AdapterValidationError", "TunerKind"]
