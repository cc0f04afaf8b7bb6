"""The one tokenization call shared by the server, the trainer and training jobs.

Served predictions equal the trainer's only if both truncate and pad the same way, so there is
exactly one place that calls the tokenizer.

An input is a text or a pair `(text, text_pair)`, encoded as the backbone's pair encoding
(`[CLS] a [SEP] b [SEP]` for BERT) and truncated `longest_first`. The second array returned is a
*segment mask*: 0 = padding, 1 = a token of the first text, 2 = a token of the second. It is the
attention mask and the token types in one array, so pairs travel through every queue, link and
worker as single texts do; `split_segments` turns it back into the two at the model's door.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the texts' check is imported by the adapter formats, which need no transformers
    import torch
    from transformers import PreTrainedTokenizerBase

Input = str | tuple[str, str]  # a text, or a pair (text, text_pair)


def flat_texts(inputs: Sequence[Input]) -> list[str]:
    """Every text of the inputs, a pair's two in order (for checks that look at each text)."""
    return [t for x in inputs for t in ((x,) if isinstance(x, str) else x)]


def segment_mask(attention_mask: np.ndarray, type_ids: np.ndarray) -> np.ndarray:
    """0 = padding, 1 = first text, 2 = second text of a pair."""
    return attention_mask * (1 + (type_ids > 0))


def split_segments(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention mask 0/1, token types 0/1) from a segment mask. Two elementwise ops, no test of whether
    any row is a pair: on a GPU that test would be a host sync per chunk, and all-zero types are what
    the model uses when given none."""
    return (segments > 0).to(segments.dtype), (segments > 1).to(segments.dtype)


def input_chars(item: Input) -> int:
    """Characters of an input; a pair's two texts together (what `max_input_chars` bounds)."""
    return len(item) if isinstance(item, str) else len(item[0]) + len(item[1])


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

    def __call__(self, texts: Sequence[Input]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, segment mask) int64 [rows, longest row]; texts are checked first (InvalidText)."""
        check_text(flat_texts(texts), "text")
        # one text: `encode` skips the batch call's thread-pool hand-off (most requests carry one)
        if len(texts) == 1:
            first = texts[0]
            encodings = [self._core.encode(first) if isinstance(first, str) else self._core.encode(*first)]
        else:
            encodings = self._core.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        if all(isinstance(x, str) for x in texts):
            return ids, mask
        return ids, segment_mask(mask, np.array([e.type_ids for e in encodings], dtype=np.int64))


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[Input],
             max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, segment mask) int64 [rows, longest row], right-padded, truncated to max_length
    (`longest_first` for pairs).

    Texts are checked first (InvalidText, a 422), so no caller can turn a lone surrogate into the
    tokenizer's TypeError (a 500); the HTTP schemas check earlier with the field's own name. The server's
    request path holds a `TextEncoder` (built once); tests check both give the same arrays."""
    check_text(flat_texts(texts), "text")
    enc = tokenizer(list(texts), padding=True, truncation="longest_first", max_length=max_length,
                    return_tensors="np", return_token_type_ids=True)
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    if all(isinstance(x, str) for x in texts):
        return ids, mask
    return ids, segment_mask(mask, enc["token_type_ids"].astype(np.int64))
