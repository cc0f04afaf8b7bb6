"""Every knob of the server in one place; each reads SWITCHBOARD_<NAME> from the environment."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    model: Path | None = Field(None, description="local model directory; default: embedded all-MiniLM-L6-v2")
    data_dir: Path = Path("./switchboard-data")
    store: str | None = Field(None, description="absent: the embedded SQLite store in data_dir; postgresql://… : a "
                                                "shared store for replicas (blobs cached in data_dir)")
    store_connect_timeout_s: float = Field(20.0, gt=0, description="at start, how long to wait for a shared store "
                                                                   "that cannot be reached yet (it may be starting)")
    store_resync_s: float = Field(30.0, gt=0, description="a shared store is re-read whole this often, in case a "
                                                          "change notification was missed")
    dtype: Literal["auto", "fp32", "bf16", "bf16-full", "int8"] = Field(
        "auto", description="encoder precision; auto: bf16-full where the hardware runs bf16 natively (AVX-512 "
                            "BF16/AMX CPUs, Ampere+ GPUs), else fp32 — docs/precision.md")
    engine_workers: int | None = Field(None, ge=0, description="engine worker processes, each running whole "
                                       "batches; 0 = the engine runs in a thread of the server process; default: "
                                       "one on a GPU, else min(cores, 2)")
    fronts: int | None = Field(None, ge=1, le=64, description="HTTP front processes on the one port (HTTP, auth, "
                               "tokenizing, JSON) in front of the one scheduler; 1 = the scheduler's process "
                               "serves HTTP alone; default: by cores — docs/engine.md#fronts")
    front_auth_cache_s: float = Field(1.0, ge=0, description="how long a front process caches a key's check (the "
                                                             "scheduler checks every job's key again)")
    threads: int = Field(0, ge=0, description="torch threads per engine (per worker); 0 = cores ÷ workers")
    engine_nice: int = Field(5, ge=0, le=19, description="niceness added to engine worker processes: the front's "
                                                         "short bursts (HTTP, tokenizing) preempt their batches, so "
                                                         "a request is not queued behind a busy core")
    engine_timeout_s: float = Field(60.0, gt=0, description="a worker that computes one batch longer than this is "
                                                            "killed and restarted; its batch fails with 503")
    # Tenants and keys (docs/security.md). No admin key: open mode, one tenant `default`, loopback only.
    admin_key: SecretStr | None = Field(None, description="the admin API key (SWITCHBOARD_ADMIN_KEY); set → auth mode")
    admin_key_file: Path | None = Field(None, description="a file holding the admin key (instead of the variable)")
    allow_unauthenticated: bool = Field(False, description="allow open mode on a non-loopback address")
    tenant_max_tasks: int | None = Field(10_000, description="tasks per tenant (admin may override); past it → 507")
    tenant_max_adapter_bytes: int | None = Field(8 << 30, description="stored adapter bytes per tenant, every "
                                                                      "version counted; past it → 507")
    tenant_max_queued_rows: int = Field(512, ge=1, description="rows a tenant may have waiting; past it → 429")
    scheduler: Literal["vtc", "fcfs"] = Field("vtc", description="vtc: fair across tenants by virtual token "
                                                                 "counters; fcfs: arrival order")
    throttle_window_ms: float = Field(50.0, ge=0, description="after a tenant is refused for its own demand, its "
                                                              "classify requests are refused before their bodies "
                                                              "are read for up to this long")
    vtc_load_charge_tokens: int = Field(256, ge=0, description="what a request that needed a cold adapter load "
                                                               "is charged on top of its tokens")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per line, for log "
                                                                    "shippers")

    max_length: int | None = Field(None, description="truncate inputs to this many tokens; default: the model's limit")

    # The HTTP edge (server/http/edge.py): enforced as bytes arrive, before the app sees the request.
    max_header_bytes: int = Field(32 << 10, ge=1024, description="request line + headers of one request; past it "
                                                                "→ 431 and the connection is closed")
    max_url_bytes: int = Field(8 << 10, ge=256, description="the request target (path and query); past it → 414")
    header_timeout_s: float = Field(10.0, gt=0, description="a request head must be complete this long after its "
                                                            "first byte (or after the connection opened, for the "
                                                            "first request); else 408 and close")
    body_idle_timeout_s: float = Field(15.0, gt=0, description="longest pause between two chunks of a request body; "
                                                               "past it → 408 and close")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="an idle keep-alive connection is closed after this")
    max_connections: int = Field(2048, ge=1, description="open connections; more are answered 503 and closed at "
                                                         "once (lowered to the open-file limit less 256)")
    tenant_max_pending_uploads: int = Field(4, ge=1, description="uploads of one tenant admitted at once (their "
                                                                 "bodies being received or parsed); more → 429 "
                                                                 "before the body is read")

    # Requests. Every client-supplied size has a bound here; see docs/limits.md.
    max_inputs_per_request: int = Field(64, description="texts per classify or embed request; with `tasks` "
                                                         "(fan-out), texts × tasks")
    max_canary_texts: int = Field(16, ge=1, description="labelled texts in an upload's `canary` field")
    max_fanout_tasks: int = Field(16, ge=1, le=64, description="tasks in one fan-out classify request")
    max_input_chars: int = Field(50_000, description="characters per classify input (tokens past max_length are "
                                                     "truncated anyway)")
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 256 << 20
    max_upload_files: int = 8
    max_labels: int = 1024
    max_label_length: int = Field(128, description="characters per label name")
    max_list_page: int = Field(1000, description="most tasks per page of GET /v1/tasks")

    # Batcher. A batch closes at max_batch_rows rows, at max_batch_tokens (rows × padded length), or
    # after batch_wait_ms once the worker is free. Tuned on 2 cores with MiniLM: see docs/benchmarks.md.
    max_batch_rows: int = 64
    max_batch_tokens: int = 8192
    max_batch_ms: float = Field(30.0, description="under overload, … or when its estimated compute time on one "
                                                   "engine worker (tokens / that worker's share of the peak "
                                                   "measured tokens per second) would pass this; 0 = off")
    batch_wait_ms: float = 2.0
    chunk_rows: int = 8
    # Fairness within the limits (docs/security.md): a request's rows are queued as chunks of at most
    # this many padded tokens (one row at least), each scheduled and charged on its own, so one huge
    # request never holds an engine worker for long while another tenant waits.
    max_chunk_tokens: int = Field(512, ge=1, description="padded tokens (rows × length) per scheduled chunk of a "
                                                         "request; one row at least")
    fair_batch_ms: float = Field(100.0, ge=0, description="while two or more tenants are active (work waiting, or "
                                                          "sent in the last fair_window_s), a batch is capped at this "
                                                          "much compute on one engine worker (at its peak rate) and "
                                                          "the workers' batches start spread over a batch's length; "
                                                          "0 = off")
    fair_window_s: float = Field(10.0, ge=0, description="how recently another tenant must have sent work (or "
                                                         "still have some waiting) for fair_batch_ms to apply")
    # Admission: the queue is bounded in tokens (rows × length); past either bound a request gets 429
    # at once, with Retry-After from the measured drain rate, instead of a 503 after waiting.
    max_queue_rows: int = 2048
    max_queue_tokens: int = Field(65_536, description="rows × length waiting in the queue")
    max_queue_delay_s: float = Field(2.0, description="refuse work whose estimated wait (queued tokens / measured "
                                                      "tokens per second) is longer: the burst allowance")
    queue_target_ms: float = Field(100.0, description="under overload admit only work that would wait at most this "
                                                      "long")
    queue_interval_ms: float = Field(250.0, description="overload = with requests waiting, more tokens offered in this "
                                                        "window than overload_factor × what the worker drains in it")
    overload_factor: float = Field(2.0, gt=1.0, description="demand over capacity that counts as overload")
    request_timeout_s: float = 30.0
    retry_after_s: int = Field(1, description="Retry-After of a 429 before any throughput was measured")
    request_threads: int = Field(2, ge=1, description="threads that tokenize requests and load evicted adapters")
    inline_tokenize_chars: int = Field(2000, ge=0, description="a request with at most this many characters in all "
                                                               "is tokenized on the event loop (a thread hop costs "
                                                               "more); longer ones in the request threads")
    upload_threads: int = Field(1, ge=1, description="threads that parse and store uploads (apart from requests)")
    max_pending_uploads: int = Field(8, ge=1, description="uploads parsing or waiting to parse; more → 429")

    max_adapter_bytes: int = Field(1 << 30, description="device-slot byte budget; least recently used unleased "
                                                        "versions are evicted past it; a larger adapter is refused")
    max_task_bytes: int = Field(128 << 20, description="parameter bytes of one task after any expansion (AdapterHub "
                                                       "zero-pads every layer to the widest); larger → 422")
    host_cache_bytes: int = Field(256 << 20, description="parsed adapters kept in host memory")

    # Few-shot training jobs (POST /v1/tasks/{task}/train): a separate process, one at a time.
    train_threads: int = Field(1, ge=1, description="torch threads of the training process")
    train_nice: int = Field(19, ge=0, le=19, description="niceness of the training process (19 = lowest priority)")
    train_sched_idle: bool = Field(True, description="Linux SCHED_IDLE for the training process: it runs only "
                                                     "when a core would otherwise be idle")
    train_max_memory_bytes: int = Field(6 << 30, description="address-space limit of the training process "
                                                             "(RLIMIT_AS); past it the job fails")
    train_max_seconds: float = Field(3600.0, description="wall-time limit of one job; past it the job is killed")
    max_train_tokens: int = Field(16_000_000, description="steps × batch rows × longest tokenized example, per job")
    max_train_examples: int = 4096
    max_train_text_chars: int = 10_000
    max_train_steps: int = 2000
    max_train_batch_size: int = 64
    max_train_body_bytes: int = 8 << 20
    max_queued_jobs: int = 8
    tenant_max_queued_jobs: int = Field(4, ge=1, description="training jobs one tenant may have waiting (429 past "
                                        "it); below max_queued_jobs, so one tenant cannot fill the queue")
    tenant_keep_finished_jobs: int = Field(64, ge=1, description="finished jobs kept per tenant for GET /v1/jobs; "
                                           "a tenant's older ones are forgotten, never another tenant's")


# Checked before anything heavy is imported, so `serve` refuses at once.
def open_mode_refusal(host: str, has_admin_key: bool, allow_unauthenticated: bool) -> str | None:
    """Why the server must not start: open mode (no keys) on an address others can reach."""
    if has_admin_key or allow_unauthenticated or is_loopback(host):
        return None
    return (f"refusing to serve without API keys on {host!r}, which is not a loopback address: set "
            "SWITCHBOARD_ADMIN_KEY (or --admin-key-file) for auth mode, or pass --allow-unauthenticated")


# Every admin key shipped as an example in deploy/ (tests/test_first_contact.py greps deploy/ so a new one
# cannot slip past): a server started with one is open to anyone who read the repository.
PLACEHOLDER_ADMIN_KEYS = frozenset({"REPLACE-ME-with-a-long-random-admin-key"})
MIN_ADMIN_KEY_CHARS = 32
ADMIN_KEY_HINT = ("make a random key: python3 -c 'import secrets; print(secrets.token_urlsafe(32))' and pass it as "
                  "SWITCHBOARD_ADMIN_KEY or in --admin-key-file")


def admin_key_refusal(key: str | None) -> str | None:
    """Why the server must not start with this admin key (checked before the model loads): a guessable
    key guards every tenant's tasks and keys. `ADMIN_KEY_HINT` says how to make a good one."""
    if key is None:
        return None
    if key.strip() in PLACEHOLDER_ADMIN_KEYS:
        return "the admin key is the placeholder shipped in deploy/: anyone who read the repository knows it"
    if len(key.strip()) < MIN_ADMIN_KEY_CHARS:
        return (f"the admin key has {len(key.strip())} characters; at least {MIN_ADMIN_KEY_CHARS} are needed, so that "
                "it cannot be guessed")
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
