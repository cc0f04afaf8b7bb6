"""Pydantic models at the HTTP edge only."""

from __future__ import annotations

import difflib
import itertools
import typing
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from switchboard.adapter_store.records import VersionRecord
from switchboard.server.core.tokenize import check_text

# Request objects have fewer than 10 fields: one with more keys than this is refused whole, before
# pydantic makes an error per unknown key (a 1 MiB body holds ~95,000 of them) — docs/limits.md.
MAX_OBJECT_FIELDS = 64
NAMED_UNKNOWN_FIELDS = 5  # an unknown-field error names (and suggests a fix for) at most this many


def unknown_fields_message(names: list[str], total: int, known: list[str], where: str = "") -> str:
    """ "unknown field 'topk' (did you mean 'top_k'?); this endpoint takes: …" for at most
    NAMED_UNKNOWN_FIELDS names (each cut to 40 characters), however many there are: the message stays
    small and did-you-mean runs a bounded number of times."""
    hints = []
    for name in names[:NAMED_UNKNOWN_FIELDS]:
        close = difflib.get_close_matches(name[:40], known, n=1)
        hints.append(repr(name[:40]) + ("…" if len(name) > 40 else "")
                     + (f" (did you mean {close[0]!r}?)" if close else ""))
    more = total - len(hints)
    return (f"unknown field{'s' if total > 1 else ''} {', '.join(hints)}{f' and {more} more' if more > 0 else ''}"
            f"{f' in {where}' if where else ''}; {where or 'this endpoint'} takes: {', '.join(known)}")


class StrictModel(BaseModel):
    """Request bodies: an unknown field is an error that names it (a misspelt `topk` is never ignored)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _bounded_fields(cls, data: Any) -> Any:
        """An object with more than MAX_OBJECT_FIELDS keys is one error naming its first unknown keys,
        found by looking at no more keys than that (no per-key work over the whole object)."""
        if isinstance(data, dict) and len(data) > MAX_OBJECT_FIELDS:
            known = cls.model_fields
            first = list(itertools.islice((str(k) for k in data if k not in known), NAMED_UNKNOWN_FIELDS))
            total = len(data) - sum(name in data for name in known)
            raise PydanticCustomError(  # worded by the error handler, which knows where the object sits
                "unknown_field", "{fields} fields; at most {limit} are read",
                {"fields": len(data), "limit": MAX_OBJECT_FIELDS, "first": first, "total": total,
                 "known": list(known)})
        return data


class ErrorBody(BaseModel):
    type: str = Field(examples=["task_not_found"])
    message: str = Field(examples=["unknown task 'sentiment'"])


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok", "degraded"] = Field(examples=["ok"], description="degraded: the shared store cannot be "
                                              "reached; resident tasks are served, writes fail with 503")


class BackboneInfo(BaseModel):
    name: str = Field(examples=["sentence-transformers/all-MiniLM-L6-v2"])
    model_type: str = Field(examples=["bert"])
    hidden_size: int = Field(examples=[384])
    num_layers: int = Field(examples=[6])
    intermediate_size: int = Field(examples=[1536])
    max_length: int = Field(examples=[128])
    fingerprint: str
    family: str = Field("bert", examples=["bert"], description="the backbone family (docs/backbones.md); on "
                        "t5 tasks classify by answer choices")


TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Absolute ceilings of the schema; the server's settings may set lower ones (docs/limits.md).
MAX_TEXT_CHARS = 1_000_000
MAX_LABEL_CHARS = 1024
MAX_INT32 = 2**31 - 1
MAX_FANOUT_TASKS = 64


def _non_empty(inputs: str | list[Any]) -> str | list[Any]:
    items = [inputs] if isinstance(inputs, str) else inputs
    if not items:
        raise ValueError("inputs must hold at least one text")
    for i, item in enumerate(items):
        parts = (item,) if isinstance(item, str) else item
        for j, text in enumerate(parts):
            if not text.strip():
                where = "inputs" if isinstance(inputs, str) else f"inputs[{i}]"
                where += f"[{j}]" if not isinstance(item, str) else ""
                raise ValueError(f"{where} is empty or only whitespace; send text to classify")
    # a lone surrogate: the tokenizer's TypeError, a 500, without this
    if isinstance(inputs, str) or all(isinstance(item, str) for item in items):
        check_text(inputs, "inputs")
    else:
        for i, item in enumerate(items):
            check_text(item if isinstance(item, str) else list(item), f"inputs[{i}]")
    return inputs


# A list of texts stops at its first bad item: one error, not one per item of a huge array.
Texts = Annotated[list[str], Field(fail_fast=True)]
# A text pair (query and passage, premise and hypothesis, two questions): the backbone's pair encoding.
Pair = Annotated[tuple[str, str], Field(description="[text, text_pair]")]
TextsOrPairs = Annotated[list[str | Pair], Field(fail_fast=True)]


class ClassifyRequest(StrictModel):
    task: str | None = Field(None, pattern=TASK_NAME, examples=["sentiment"],
                             description="task name (at most 64 characters); or `tasks`")
    tasks: list[Annotated[str, Field(pattern=TASK_NAME)]] | None = Field(
        None, min_length=1, max_length=MAX_FANOUT_TASKS, fail_fast=True, examples=[["moderation", "topic"]],
        description="fan-out: every input under each of these tasks, in one mixed batch (max_fanout_tasks); "
                    "instead of `task`")
    inputs: str | TextsOrPairs = Field(
        examples=[["I loved it", "terrible service"], [["is DNS a protocol?", "DNS resolves names."]]],
        description="one text or a list (max_inputs_per_request, max_input_chars); an item may be a pair "
                    "[text, text_pair] for pair tasks (tokenized as the backbone's pair encoding); no empty text")
    raw_scores: bool = Field(False, description="logits instead of softmax probabilities")
    top_k: int | None = Field(None, ge=1, le=MAX_INT32, description="keep the k best labels per input")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"task": "sentiment", "inputs": ["I loved it"], "top_k": 2},
        {"tasks": ["moderation", "topic"], "inputs": "a chess engine"}]})

    _inputs = field_validator("inputs")(_non_empty)

    @model_validator(mode="after")
    def _one_of_task_or_tasks(self) -> ClassifyRequest:
        if (self.task is None) == (self.tasks is None):
            raise ValueError("send exactly one of `task` (one task) or `tasks` (a list, fan-out)")
        if self.tasks is not None and len(set(self.tasks)) != len(self.tasks):
            raise ValueError("`tasks` names a task twice")
        return self


class RerankRequest(StrictModel):
    task: str = Field(pattern=TASK_NAME, examples=["doc-relevance"],
                      description="a pair task whose labels are one score, or two with the second meaning relevant")
    query: str = Field(examples=["resolve host names"], description="the first text of every pair")
    documents: Texts = Field(examples=[["a DNS server", "a chess engine"]],
                             description="each scored as the pair [query, document] (max_inputs_per_request, "
                                         "max_input_chars for query + document)")
    top_n: int | None = Field(None, ge=1, le=MAX_INT32, description="keep the n best documents")
    return_documents: bool = Field(False, description="echo each document's text in its result")
    raw_scores: bool = Field(False, description="the relevance logit instead of a probability")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"task": "doc-relevance", "query": "resolve host names", "documents": ["a DNS server", "a chess engine"],
         "top_n": 1, "return_documents": True}]})

    @field_validator("query")
    @classmethod
    def _query(cls, query: str) -> str:
        if not query.strip():
            raise ValueError("query is empty or only whitespace")
        check_text(query, "query")
        return query

    @field_validator("documents")
    @classmethod
    def _documents(cls, documents: list[str]) -> list[str]:
        if not documents:
            raise ValueError("documents must hold at least one text")
        for i, text in enumerate(documents):
            if not text.strip():
                raise ValueError(f"documents[{i}] is empty or only whitespace")
        check_text(documents, "documents")
        return documents


class RerankResult(BaseModel):
    index: int = Field(description="the document's position in the request")
    relevance_score: float
    document: str | None = Field(None, description="the document's text, with `return_documents`")


class RerankResponse(BaseModel):
    task: str
    version: int
    results: list[RerankResult] = Field(description="sorted by relevance_score, descending")


class EmbedRequest(StrictModel):
    inputs: str | Texts = Field(examples=[["a chess engine", "DNS server"]],
                                    description="one text or a list (max_inputs_per_request, max_input_chars)")
    normalize: bool = Field(True, description="unit length (cosine similarity = dot product)")

    _inputs = field_validator("inputs")(_non_empty)


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int


class Prediction(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    task: str
    version: int
    predictions: list[list[Prediction]]


class FanOutResponse(BaseModel):
    results: list[ClassifyResponse] = Field(description="one per task, in the order of `tasks`")


def _version_summary_model() -> type[BaseModel]:
    """The API's version summary, derived from the one task-version record (its SUMMARY_FIELDS)."""
    hints = typing.get_type_hints(VersionRecord)
    hints["num_labels"] = int
    fields: dict[str, typing.Any] = {name: (hints[name], ...) for name in VersionRecord.SUMMARY_FIELDS}
    fields["kind"] = (str, Field(examples=["ia3"], description="ia3, houlsby or mixed"))
    fields["params"] = (int, Field(description="trained parameters, head included"))
    return create_model("TaskVersionSummary", **fields)


TaskVersionSummary = _version_summary_model()


class TaskSummary(TaskVersionSummary):  # type: ignore[misc,valid-type]
    created_at: float
    versions: list[TaskVersionSummary]


class RollbackRequest(StrictModel):
    version: int = Field(ge=1, le=MAX_INT32, examples=[1])


class TaskList(BaseModel):
    tasks: list[TaskVersionSummary]  # type: ignore[valid-type]
    next: str | None = Field(None, description="pass as `after` for the next page; null on the last page")


class LabelledText(StrictModel):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, examples=["I loved it"],
                      description="max_train_text_chars characters at most (with text_pair: both together)")
    text_pair: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS,
                                  description="the second text of a pair task's example")
    label: str = Field(min_length=1, max_length=MAX_LABEL_CHARS, examples=["positive"],
                       description="max_label_length characters at most")


class TrainRequest(StrictModel):
    """A few-shot (IA)3 job: T-Few's recipe (fixed steps, lr 3e-3) on the frozen backbone."""

    examples: list[LabelledText] = Field(min_length=2, fail_fast=True)
    eval_examples: list[LabelledText] | None = Field(None, fail_fast=True,
                                                     description="scored after training; default: the training "
                                                                 "examples themselves")
    steps: int = Field(300, ge=1, le=MAX_INT32, description="max_train_steps at most")
    batch_size: int = Field(16, ge=1, le=1024, description="max_train_batch_size at most")
    lr: float = Field(3e-3, gt=0, le=1, allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    choices: list[Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]] | None = Field(
        None, min_length=2, max_length=64,
        description="T5 backbones only (rank classification, T-Few): the answer choice of each label, which "
                    "are the labels themselves; every example's label must be one of them")
    template: str | None = Field(None, min_length=1, max_length=2000,
                                 examples=["{text} Is this review positive or negative?"],
                                 description="T5 backbones only: the prompt around each text, holding {text} once")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"examples": [{"text": "I loved it", "label": "positive"}, {"text": "awful", "label": "negative"}],
         "steps": 100}]})


class JobResult(TaskVersionSummary):  # type: ignore[misc,valid-type]
    """The version the job registered, with its evaluation."""

    accuracy: float
    macro_f1: float
    evaluated_on: str
    train_seconds: float
    steps: int


class JobSummary(BaseModel):
    id: str
    task: str
    status: str = Field(examples=["running"], description="queued, running, succeeded, failed or cancelled")
    step: int
    total_steps: int
    loss: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    result: JobResult | None
    error: str | None


class JobList(BaseModel):
    jobs: list[JobSummary]


class KeyCreate(StrictModel):
    tenant: str = Field(pattern=TASK_NAME, examples=["acme"], description="the tenant the key acts for")
    scopes: list[Literal["classify", "manage"]] = Field(min_length=1, max_length=2, examples=[["classify"]])
    name: str | None = Field(None, max_length=100, examples=["frontend"])
    expires_at: datetime | None = Field(None, description="RFC 3339; the key is refused from then on")


class KeyInfo(BaseModel):
    id: str
    tenant: str
    scopes: list[str]
    name: str | None
    created_at: datetime
    expires_at: datetime | None


class KeyCreated(KeyInfo):
    key: str = Field(description="the secret: shown this once, stored only as a hash")


class KeyList(BaseModel):
    keys: list[KeyInfo]


class TenantQuota(StrictModel):
    """Quota overrides; null (or absent) means the server's default."""

    max_tasks: int | None = Field(None, ge=0, le=MAX_INT32)
    max_adapter_bytes: int | None = Field(None, ge=0, le=2**62)
    max_queued_rows: int | None = Field(None, ge=1, le=MAX_INT32)


class TenantUsage(BaseModel):
    tasks: int
    adapter_bytes: int
    queued_rows: int


class TenantInfo(BaseModel):
    tenant: str
    max_tasks: int | None = Field(description="in effect (override or default); null: unlimited")
    max_adapter_bytes: int | None
    max_queued_rows: int
    usage: TenantUsage


class ResidentVersion(BaseModel):
    tenant: str
    task: str
    version: int
    bytes: int
    pins: int = Field(description="requests holding it now")
    resident_s: float = Field(description="seconds since it was loaded into its slot")


class Residency(BaseModel):
    """What this replica holds in device slots: for routers smarter than a hash, and for operators."""

    resident: list[ResidentVersion] = Field(description="least recently used first")
    resident_bytes: int
    slot_budget_bytes: int
    registered_tasks: int
