"""Pydantic models at the HTTP edge only."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    type: str = Field(examples=["task_not_found"])
    message: str = Field(examples=["unknown task 'sentiment'"])


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class BackboneInfo(BaseModel):
    name: str = Field(examples=["sentence-transformers/all-MiniLM-L6-v2"])
    model_type: str = Field(examples=["bert"])
    hidden_size: int = Field(examples=[384])
    num_layers: int = Field(examples=[6])
    intermediate_size: int = Field(examples=[1536])
    max_length: int = Field(examples=[128])
    fingerprint: str


class ClassifyRequest(BaseModel):
    task: str = Field(examples=["sentiment"])
    inputs: str | list[str] = Field(examples=[["I loved it", "terrible service"]])
    raw_scores: bool = Field(False, description="logits instead of softmax probabilities")
    top_k: int | None = Field(None, ge=1, description="keep the k best labels per input")

    model_config = {"json_schema_extra": {"examples": [{"task": "sentiment", "inputs": ["I loved it"], "top_k": 2}]}}


class Prediction(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    task: str
    version: int
    predictions: list[list[Prediction]]


class TaskVersionSummary(BaseModel):
    task: str
    version: int
    kind: str = Field(examples=["ia3"])
    num_labels: int
    labels: list[str]
    params: int
    bytes: int
    sha256: str


class TaskSummary(TaskVersionSummary):
    created_at: float
    versions: list[TaskVersionSummary]


class RollbackRequest(BaseModel):
    version: int = Field(ge=1, examples=[1])


class TaskList(BaseModel):
    tasks: list[TaskSummary]
