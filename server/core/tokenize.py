"""The one tokenization call shared by the server, the trainer and training jobs.

Served predictions equal the trainer's only if both truncate and pad the same way, so there is
exactly one place that calls the tokenizer.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the texts' check is imported by the adapter formats, which need no transformers
    from transformers import PreTrainedTokenizerBase


class InvalidText(ValueError):
    """A text that is not valid Unicode: a lone surrogate, which JSON's `\\ud800` escape can carry into a
    Python str. The tokenizer raises TypeError on it and nothing can encode it as UTF-8 (store, logs,
    responses), so it is refused up front as a 422 `validation_error` (a ValueError, so a pydantic
    validator that raises it makes an ordinary validation error)."""


def check_text(texts: str | Sequence[str], where: str) -> None:
    """Raise InvalidText naming the first text that holds a lone surrogate.

    One UTF-8 encode of all texts at once (a copy at memory speed); which text is at fault is worked
    out only on failure. `where` names the field: "inputs" gives "inputs[3]"; a "{}" in it is replaced
    by the index ("canary[{}].text" gives "canary[3].text"); a single str is named `where` itself.
    """
    items = [texts] if isinstance(texts, str) else texts
    try:
        "".join(items).encode("utf-8")
    except UnicodeEncodeError as exc:
        ends = list(itertools.accumulate(map(len, items)))
        i = bisect.bisect_right(ends, exc.start)
        at = exc.start - (ends[i - 1] if i else 0)
        name = where if isinstance(texts, str) else where.format(i) if "{}" in where else f"{where}[{i}]"
        raise InvalidText(f"{name} is not valid Unicode text: it holds a lone surrogate "
                          f"(U+{ord(exc.object[exc.start]):04X} at character {at})") from None


class TextEncoder:
    """The tokenizer's Rust core, configured once: truncation at max_length, right padding to the longest
    row. Calling the core directly costs a fraction of the Python wrapper's per-call work (argument
    checks, setting truncation and padding again, a dict of tensors), which dominated a one-text request."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        from tokenizers import Tokenizer  # a dependency of transformers' fast tokenizers

        core = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: the wrapper re-configures its own
        core.enable_truncation(max_length)
        pad_id = int(tokenizer.pad_token_id or 0)
        core.enable_padding(direction="right", pad_id=pad_id, pad_token=str(tokenizer.pad_token or "[PAD]"))
        self._core = core
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) int64 [rows, longest row]; texts are checked first (InvalidText)."""
        check_text(texts, "text")
        # one text: `encode` skips the batch call's thread-pool hand-off (most requests carry one)
        encodings = [self._core.encode(texts[0])] if len(texts) == 1 else self._core.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 [rows, longest row], right-padded, truncated to max_length.

    Texts are checked first (InvalidText, a 422), so no caller can turn a lone surrogate into the
    tokenizer's TypeError (a 500); the HTTP schemas check earlier with the field's own name. The server's
    request path holds a `TextEncoder` (built once); tests check both give the same arrays."""
    check_text(texts, "text")
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
