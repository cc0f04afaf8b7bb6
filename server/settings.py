"""Every knob of the server in one place; each reads SWITCHBOARD_<NAME> from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    model: Path | None = Field(None, description="local model directory; default: embedded all-MiniLM-L6-v2")
    data_dir: Path = Path("./switchboard-data")
    dtype: Literal["fp32", "bf16"] = "fp32"
    threads: int = Field(0, description="torch intra-op threads; 0 = all cores")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per line, for log "
                                                                    "shippers")

    max_length: int | None = Field(None, description="truncate inputs to this many tokens; default: the model's limit")
    max_inputs_per_request: int = 64
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 256 << 20
    max_labels: int = 1024

    # Batcher. A batch closes at max_batch_rows rows, at max_batch_tokens (rows × padded length), or
    # after batch_wait_ms once the worker is free. Tuned on 2 cores with MiniLM: see docs/benchmarks.md.
    max_batch_rows: int = 64
    max_batch_tokens: int = 8192
    batch_wait_ms: float = 2.0
    chunk_rows: int = 8
    max_queue_rows: int = 2048
    request_timeout_s: float = 30.0
    retry_after_s: int = 1

    max_adapter_bytes: int = Field(1 << 30, description="device-slot byte budget; least recently used unpinned "
                                                        "versions are evicted past it")
    host_cache_bytes: int = Field(256 << 20, description="parsed adapters kept in host memory")

    # Few-shot training jobs (POST /v1/tasks/{task}/train): a separate process, one at a time.
    train_threads: int = Field(1, ge=1, description="torch threads of the training process")
    train_nice: int = Field(19, ge=0, le=19, description="niceness of the training process (19 = lowest priority)")
    train_sched_idle: bool = Field(True, description="Linux SCHED_IDLE for the training process: it runs only "
                                                     "when a core would otherwise be idle")
    max_train_examples: int = 4096
    max_train_steps: int = 2000
    max_train_body_bytes: int = 8 << 20
    max_queued_jobs: int = 8
