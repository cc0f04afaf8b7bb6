"""Training data: CSV/JSONL files → (text, label) pairs with clear errors, and the epoch's batches."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from pathlib import Path


class DataError(ValueError):
    """The training data cannot be used; the message says why. `found_columns`: the file's columns, when
    the text or label column is missing (the CLI's hint names them beside --text-column/--label-column)."""

    def __init__(self, message: str, found_columns: list[str] | None = None) -> None:
        super().__init__(message)
        self.found_columns = found_columns


def read_examples(path: Path, text_column: str = "text", label_column: str = "label",
                  min_labels: int = 2) -> list[tuple[str, str]]:
    """CSV or JSONL → (text, label) pairs, with clear errors for the usual mistakes. Training needs two
    labels at least (`min_labels`); a canary may state one."""
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    rows: list[dict] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: invalid JSON ({exc.msg})") from exc
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(raw.splitlines()))
    else:
        raise DataError(f"{path}: use a .csv or .jsonl file")
    if not rows:
        raise DataError(f"{path}: no examples")
    missing = [c for c in (text_column, label_column) if c not in rows[0]]
    if missing:
        found = [str(c) for c in rows[0]]  # in the file's order: the header as the user wrote it
        raise DataError(f"{path}: missing column(s) {missing}; found {found}", found_columns=found)
    examples = [(str(r[text_column]), str(r[label_column])) for r in rows]
    if len({label for _, label in examples}) < min_labels:
        count = "two" if min_labels == 2 else str(min_labels)
        raise DataError(f"{path}: needs at least {count} distinct labels")
    return examples


def epoch_batches(examples: list[tuple[str, str]], batch_size: int, rng: random.Random,
                  group_by_length: bool) -> Iterator[list[tuple[str, str]]]:
    """Shuffled batches; grouped by length within blocks of 32 batches (Hugging Face's group_by_length)."""
    examples = list(examples)
    rng.shuffle(examples)
    if not group_by_length:
        yield from (examples[i:i + batch_size] for i in range(0, len(examples), batch_size))
        return
    block = batch_size * 32
    batches = []
    for i in range(0, len(examples), block):
        ordered = sorted(examples[i:i + block], key=lambda e: len(e[0]))
        batches += [ordered[j:j + batch_size] for j in range(0, len(ordered), batch_size)]
    rng.shuffle(batches)
    yield from batches
