"""Batch shape defaults per device: the one place that says what a GPU gets instead of the CPU's.

The CPU values are the settings' own defaults (measured on this project's 2-core CPU: 64 rows, 8,192
tokens, length-sorted chunks of 8 rows so a long row does not pad 63 short ones). A GPU runs one
large batch best: many more rows and tokens per forward pass and no chunking (one kernel launch
sequence per batch instead of one per 8 rows). A setting given explicitly (flag or environment)
always wins. The GPU values are a starting point until bench/device_check.py measures them on a lent
device (docs/gpu.md).
"""

from __future__ import annotations

import torch

from switchboard.server.settings import Settings

GPU_DEFAULTS: dict[str, int] = {"max_batch_rows": 256, "max_batch_tokens": 65_536, "chunk_rows": 0}


def for_device(settings: Settings, device: torch.device) -> Settings:
    """`settings` with the batch shape defaults of `device` where the operator set none."""
    if device.type != "cuda":
        return settings
    chosen = {k: v for k, v in GPU_DEFAULTS.items() if k not in settings.model_fields_set}
    return settings.model_copy(update=chosen) if chosen else settings
