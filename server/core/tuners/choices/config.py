"""A task's answer choices and prompt template, as token ids of the backbone's tokenizer.

T-Few classifies with an encoder-decoder: the input (wrapped in the task's template) is encoded, and
each answer choice (a verbalizer, one or more tokens) is scored by the decoder's length-normalised
log-probability; the best choice is the answer. Ids are stored as float32 tensors holding exact
integers (every file tensor is a float), -1 past a choice's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_CHOICE_TOKENS = 32  # a verbalizer longer than this is a prompt, not an answer
# each choice costs a decoder pass over every batch holding the task: more would let one tenant's task
# slow every batch it rides in (the training job's schema has the same bound)
MAX_CHOICES = 64
MAX_TEMPLATE_TOKENS = 64  # each of the template's two sides (before and after the text)
TEXT_SLOT = "{text}"


@dataclass
class ChoiceWeights:
    """token_ids [C, Lc] (-1 padded); prefix_ids / suffix_ids [MAX_TEMPLATE_TOKENS] (-1 padded): the
    template's tokens before and after the input text."""

    token_ids: torch.Tensor
    prefix_ids: torch.Tensor
    suffix_ids: torch.Tensor
    temperature: float = 1.0

    @property
    def num_labels(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def has_template(self) -> bool:
        return bool((self.prefix_ids >= 0).any() or (self.suffix_ids >= 0).any())


def _padded(ids: list[int], width: int) -> torch.Tensor:
    return torch.tensor(ids + [-1] * (width - len(ids)), dtype=torch.float32)


def choices_from_text(tokenizer: object, choices: list[str], template: str | None = None) -> ChoiceWeights:
    """Tokenize verbalizers (with the tokenizer's closing token, as T5 scores "positive</s>") and a
    template such as "{text} Is this review positive or negative?" (split at its one {text})."""
    if not choices:
        raise ValueError("a rank-classification task needs at least one answer choice")
    ids = [list(tokenizer(c, add_special_tokens=True)["input_ids"]) for c in choices]  # type: ignore[operator]
    if len({tuple(i) for i in ids}) != len(ids):
        raise ValueError("two answer choices tokenize the same; they could never be told apart")
    if len(ids) > MAX_CHOICES:
        raise ValueError(f"{len(ids)} answer choices; at most {MAX_CHOICES}")
    longest = max(map(len, ids))
    if longest > MAX_CHOICE_TOKENS:
        raise ValueError(f"an answer choice is {longest} tokens long; at most {MAX_CHOICE_TOKENS}")
    token_ids = torch.stack([_padded(i, longest) for i in ids])
    before, after = "", ""
    if template:
        if template.count(TEXT_SLOT) != 1:
            raise ValueError(f"the template must hold {TEXT_SLOT} exactly once")
        before, after = template.split(TEXT_SLOT)
    sides = [list(tokenizer(side, add_special_tokens=False)["input_ids"]) if side.strip() else []  # type: ignore[operator]
             for side in (before, after)]
    for side in sides:
        if len(side) > MAX_TEMPLATE_TOKENS:
            raise ValueError(f"each side of the template may hold at most {MAX_TEMPLATE_TOKENS} tokens")
    return ChoiceWeights(token_ids, _padded(sides[0], MAX_TEMPLATE_TOKENS), _padded(sides[1], MAX_TEMPLATE_TOKENS))
