"""Numeric precision of the frozen encoder, chosen by measurement (docs/precision.md).

- `fp32`: everything in float32.
- `bf16`: mixed — the encoder's Linear weights and matmuls in bfloat16; embeddings, the residual
  stream, LayerNorms, attention and heads in float32. Per-task pools of the big kinds in bfloat16.
- `bf16-full`: the whole encoder in bfloat16 (embeddings, residual stream, LayerNorms, attention,
  pooler); only the heads' matmuls and the logits stay float32.
- `int8`: the encoder's Linears dynamically quantized (int8 weights per output channel, activations
  quantized per batch; VNNI on x86); everything else float32.

`auto` resolves to the fastest mode whose top-1 agreement with fp32 passed 99.5 % on both of our
text sets (bf16-full: ≥ 99.75 %, bench/precision.py), where the hardware runs it natively (`resolve`).
"""

from __future__ import annotations

import enum
import logging

import torch

from switchboard.server.core.families import family_for
from switchboard.server.core.site_hooks import reinstall

log = logging.getLogger(__name__)


class Precision(enum.StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    BF16_FULL = "bf16-full"
    INT8 = "int8"

    @property
    def pool_dtype(self) -> torch.dtype:
        """The dtype of the per-task slot pools (small float32 components aside)."""
        return torch.bfloat16 if self in (Precision.BF16, Precision.BF16_FULL) else torch.float32


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device) -> bool:
    """bfloat16 matmuls in hardware: Ampere or newer GPUs; AVX-512 BF16 or AMX on x86 CPUs."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve(requested: str, device: torch.device) -> Precision:
    """`auto` → bf16-full where bf16 runs natively, fp32 elsewhere; any other value is taken as given."""
    if requested != "auto":
        return Precision(requested)
    chosen = Precision.BF16_FULL if native_bf16(device) else Precision.FP32
    log.info("precision auto → %s on %s (native bf16: %s)", chosen, device, chosen is Precision.BF16_FULL)
    return chosen


def prepare(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """Convert the encoder in place for `precision`; the forward (forward.py) adapts to what it finds."""
    model.float()
    family = family_for(model.config.model_type)
    layers = [layer for stack in (family.stacks if family else ("encoder.layer",))
              for layer in model.get_submodule(stack)]
    if precision is Precision.BF16 and family is not None and not family.functional:
        raise ValueError(f"precision bf16 (bf16 matmuls in a float32 stream) needs the functional BERT path; "
                         f"the {family.name} family runs Hugging Face's forward: use bf16-full or fp32")
    if precision is Precision.BF16:
        for layer in layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    module.to(torch.bfloat16)
    elif precision is Precision.BF16_FULL:
        model.to(torch.bfloat16)
    elif precision is Precision.INT8:
        if next(model.parameters()).device.type != "cpu":
            raise ValueError("int8 dynamic quantization runs on the CPU only; use bf16 on a GPU")
        for layer in layers:
            torch.ao.quantization.quantize_dynamic(layer, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    if family is not None:
        reinstall(model, family)  # quantization replaced the Linears the hooks were on
    return model
