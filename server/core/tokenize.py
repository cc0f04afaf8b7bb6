"""The one tokenization call shared by the server, the trainer and training jobs.

Served predictions equal the trainer's only if both truncate and pad the same way, so there is
exactly one place that calls the tokenizer.
"""

from __future__ import annotations

import numpy as np
from transformers import PreTrainedTokenizerBase


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 [rows, longest row], right-padded, truncated to max_length."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
