"""Backbone families: one module each, this tuple is their one registration (docs/backbones.md)."""

from __future__ import annotations

from switchboard.server.core.families.base import Family, SiteRef
from switchboard.server.core.families.bert import BERT
from switchboard.server.core.families.deberta_v2 import DEBERTA_V2
from switchboard.server.core.families.decoder import DECODER
from switchboard.server.core.families.distilbert import DISTILBERT
from switchboard.server.core.families.modernbert import MODERNBERT
from switchboard.server.core.families.mpnet import MPNET
from switchboard.server.core.families.t5 import T5

FAMILIES: tuple[Family, ...] = (BERT, DISTILBERT, MPNET, DEBERTA_V2, MODERNBERT, DECODER, T5)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)
# every site name some family has, in first-seen order (file tensors are named by these)
ALL_SITES: tuple[str, ...] = tuple(dict.fromkeys(site for f in FAMILIES for site in f.sites))


def family_for(model_type: str) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def family_named(name: str) -> Family | None:
    """The family a BackboneSpec names (`spec.family`)."""
    return next((f for f in FAMILIES if f.name == name), None)


__all__ = ["ALL_SITES", "BERT", "FAMILIES", "SUPPORTED_MODEL_TYPES", "Family", "SiteRef", "family_for", "family_named"]
