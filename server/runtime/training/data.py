"""Training data: CSV/JSONL files → (input, label) examples with clear errors, and the epoch's batches.

An input is a text, or a pair (text, text_pair) when the file has a `text_pair` column (pair tasks:
duplicates, entailment, relevance). A rerank file — query, positive, negatives — becomes pairs labelled
`relevant` / `irrelevant` (`read_rerank_examples`)."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from pathlib import Path

from switchboard.server.core.tokenize import Input, input_chars

Example = tuple[Input, str]  # (text or (text, text_pair), label)
RERANK_LABELS = ("irrelevant", "relevant")  # sorted, so "relevant" is the second label: /v1/rerank's score


class DataError(ValueError):
    """The training data cannot be used; the message says why. `found_columns`: the file's columns, when
    the text or label column is missing (the CLI's hint names them beside --text-column/--label-column)."""

    def __init__(self, message: str, found_columns: list[str] | None = None) -> None:
        super().__init__(message)
        self.found_columns = found_columns


def read_rows(path: Path) -> list[dict]:
    """The rows of a .csv or .jsonl file, with clear errors for the usual mistakes."""
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    rows: list[dict] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: invalid JSON ({exc.msg})") from exc
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{n}: each line must be a JSON object")
                rows.append(row)
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(raw.splitlines()))
    else:
        raise DataError(f"{path}: use a .csv or .jsonl file")
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def _require(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        found = [str(c) for c in rows[0]]  # in the file's order: the header as the user wrote it
        raise DataError(f"{path}: missing column(s) {missing}; found {found}", found_columns=found)


def read_examples(path: Path, text_column: str = "text", label_column: str = "label",
                  min_labels: int = 2, text_pair_column: str = "text_pair") -> list[Example]:
    """CSV or JSONL → (input, label) examples; a row's input is the pair (text, text_pair) when the file has
    a `text_pair_column`. Training needs two labels at least (`min_labels`); a canary may state one."""
    rows = read_rows(path)
    _require(path, rows, (text_column, label_column))
    if text_pair_column in rows[0]:
        examples: list[Example] = [((str(r[text_column]), str(r[text_pair_column])), str(r[label_column]))
                                   for r in rows]
    else:
        examples = [(str(r[text_column]), str(r[label_column])) for r in rows]
    if len({label for _, label in examples}) < min_labels:
        count = "two" if min_labels == 2 else str(min_labels)
        raise DataError(f"{path}: needs at least {count} distinct labels")
    return examples


def read_rerank_examples(path: Path, query_column: str = "query", positive_column: str = "positive",
                         negatives_column: str = "negatives") -> list[Example]:
    """(query, positive, negatives) rows → ((query, document), relevant|irrelevant) pairs. In JSONL
    `negatives` is a list of texts; in CSV one text per row (repeat the query for more)."""
    rows = read_rows(path)
    _require(path, rows, (query_column, positive_column, negatives_column))
    irrelevant, relevant = RERANK_LABELS
    examples: list[Example] = []
    for n, r in enumerate(rows, 1):
        negatives = r[negatives_column]
        negatives = negatives if isinstance(negatives, list) else [negatives]
        query = str(r[query_column])
        examples.append(((query, str(r[positive_column])), relevant))
        examples += [((query, str(d)), irrelevant) for d in negatives if str(d).strip()]
        if not any(str(d).strip() for d in negatives):
            raise DataError(f"{path}: row {n} has no negative document; reranking learns from both kinds")
    return examples


def default_pooling(examples: list[Example]) -> str:
    """The head's pooling when none is asked for: `pair` for pair tasks (it starts from the bi-encoder's
    geometry; measured against mean pooling in docs/accuracy.md), `mean` for single texts."""
    return "pair" if examples and not isinstance(examples[0][0], str) else "mean"


def epoch_batches(examples: list[Example], batch_size: int, rng: random.Random,
                  group_by_length: bool) -> Iterator[list[Example]]:
    """Shuffled batches; grouped by length within blocks of 32 batches (Hugging Face's group_by_length)."""
    examples = list(examples)
    rng.shuffle(examples)
    if not group_by_length:
        yield from (examples[i:i + batch_size] for i in range(0, len(examples), batch_size))
        return
    block = batch_size * 32
    batches = []
    for i in range(0, len(examples), block):
        ordered = sorted(examples[i:i + block], key=lambda e: input_chars(e[0]))
        batches += [ordered[j:j + batch_size] for j in range(0, len(ordered), batch_size)]
    rng.shuffle(batches)
    yield from batches
