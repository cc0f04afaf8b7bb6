"""Per-task module kinds, one folder per method; this tuple is their one registration.

Order is the order of application where two kinds share a site (none do today) and the order of
tensors in files. Exactly one of a task's kinds is a readout (the head, or T5's answer choices).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from switchboard.server.core.tuners.base import AdapterValidationError, TunerKind
from switchboard.server.core.tuners.choices.kind import ChoicesKind
from switchboard.server.core.tuners.head.kind import HeadKind
from switchboard.server.core.tuners.houlsby.kind import HoulsbyKind
from switchboard.server.core.tuners.ia3.kind import Ia3Kind
from switchboard.server.core.tuners.layer_norm.kind import LayerNormKind

KINDS: tuple[TunerKind, ...] = (Ia3Kind(), HoulsbyKind(), LayerNormKind(), HeadKind(), ChoicesKind())
KINDS_BY_NAME: Mapping[str, TunerKind] = MappingProxyType({kind.name: kind for kind in KINDS})
READOUTS: tuple[str, ...] = tuple(kind.name for kind in KINDS if kind.is_readout)  # a task has exactly one
READOUT: str = READOUTS[0]  # the classification head; T5 tasks read out by their answer choices instead


def readout_name(parts: Mapping[str, object]) -> str:
    """The readout kind among a task's (or a batch's) parts."""
    return next((name for name in READOUTS if name in parts), READOUT)

__all__ = ["KINDS", "KINDS_BY_NAME", "READOUT", "READOUTS", "readout_name", "AdapterValidationError", "TunerKind"]
