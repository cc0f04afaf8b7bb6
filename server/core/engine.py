"""The multi-task engine: one frozen encoder, per-task modules in slot pools, mixed batches.

Each resident task owns a *task slot*; the task slot routes to one slot in each component pool it
uses (one per tuner kind and shape: (IA)3 site, Houlsby width/activation, LayerNorm, head shape).
Pools are keyed by shape, so a task occupies exactly its own parameter bytes. A batch gathers every
row's parameters by index: no Python loop over examples.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from switchboard.server.core import memory
from switchboard.server.core.adapter import TaskAdapter
from switchboard.server.core.backbone import Backbone, BackboneSpec
from switchboard.server.core.books import BooksView, CapacityError, SlotBooks
from switchboard.server.core.forward import BatchParams, encode, encoder_forward
from switchboard.server.core.precision import Precision, prepare
from switchboard.server.core.slot_pool import StackedPool
from switchboard.server.core.tokenize import tokenize
from switchboard.server.core.tuners import KINDS_BY_NAME
from switchboard.server.core.tuners.base import Component, PoolKey


@dataclass(frozen=True)
class ResidentTask:
    slot: int
    num_labels: int
    nbytes: int
    temperature: float = 1.0  # the head's calibration (probabilities = softmax(logits / temperature))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device without stalling the host: through pinned memory, asynchronously, on a GPU."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def pool_dtype(component: Component, dtype: torch.dtype) -> torch.dtype:
    """The dtype a component is pooled in: float32 for the tiny ones that set precision (heads, norms)."""
    return torch.float32 if component.float32 else dtype


def resident_nbytes(components: list[Component], dtype: torch.dtype) -> int:
    """Resident bytes of a task: its slots in every pool, at each pool's dtype."""
    return sum(sum(int(torch.Size(shape).numel()) for shape, _ in c.fields.values())
               * torch.empty((), dtype=pool_dtype(c, dtype)).element_size() for c in components)


def plan_chunks(attention_mask: torch.Tensor, chunk_rows: int) -> list[tuple[torch.Tensor, int]]:
    """(rows, padded width) per chunk: rows sorted by length, `chunk_rows` at a time (0 = one chunk)."""
    lengths = (attention_mask > 0).sum(1)  # a segment mask holds 2s: count tokens, not values
    B, T = attention_mask.shape
    right_padded = bool((attention_mask[:, 0] > 0).all()) or T == 0
    if chunk_rows <= 0 or chunk_rows >= B:
        return [(torch.arange(B), int(lengths.max()) if right_padded and B else T)]
    order = torch.argsort(lengths, descending=True, stable=True)
    return [(rows, int(lengths[rows].max()) if right_padded else T) for rows in torch.split(order, chunk_rows)]


class SlotBudget(BooksView):
    """What a task costs resident, and whether it could ever fit: shared by the in-process engine and
    the worker-process engine, whose `books` (core/books.py) are the one record of slots and bytes."""

    spec: BackboneSpec
    model: torch.nn.Module
    dtype: torch.dtype
    books: SlotBooks

    @property
    def max_adapter_bytes(self) -> int:
        return self.books.max_bytes

    @max_adapter_bytes.setter
    def max_adapter_bytes(self, value: int) -> None:
        self.books.max_bytes = value

    def components(self, adapter: TaskAdapter) -> list[Component]:
        return [c for kind, w in adapter.items() for c in kind.components(w, self.spec, self.model)]

    def task_bytes(self, adapter: TaskAdapter) -> int:
        return resident_nbytes(self.components(adapter), self.dtype)

    def check_fits(self, adapter: TaskAdapter) -> int:
        """The task's resident bytes; CapacityError if it could never fit, even in an empty engine."""
        nbytes = self.task_bytes(adapter)
        if nbytes > self.max_adapter_bytes:
            raise CapacityError(f"the adapter needs {nbytes} bytes resident, more than the whole slot budget of "
                                f"{self.max_adapter_bytes} bytes (max_adapter_bytes)")
        return nbytes


class Engine(SlotBudget):
    def __init__(self, backbone: Backbone, *, precision: Precision | str = Precision.FP32,
                 device: torch.device | str | None = None, max_adapter_bytes: int = 1 << 30,
                 segment_max_tasks: int = 4, chunk_rows: int = 8, initial_slots: int = 16) -> None:
        """max_adapter_bytes bounds the bytes of resident task parameters (the pools' used slots).

        segment_max_tasks: a Houlsby pool used by at most this many distinct tasks in a batch runs one
        GEMM per task (segment matmul) instead of a per-row batched matmul over gathered weights.
        chunk_rows: a batch is run as length-sorted chunks of this many rows, each padded only to its
        own longest row (0 = one chunk). CPU throughput stops growing past ~8 rows, so this wins back
        padding at no cost (docs/benchmarks.md).
        """
        self.backbone = backbone
        self.spec: BackboneSpec = backbone.spec
        self.device = torch.device(device) if device is not None else default_device()
        self.precision = Precision(precision)
        self.dtype = self.precision.pool_dtype
        self.model = prepare(backbone.model.to(self.device), self.precision)
        self.books = SlotBooks(max_adapter_bytes)
        self.segment_max_tasks = segment_max_tasks
        self.chunk_rows = chunk_rows
        self.pad_id = int(backbone.tokenizer.pad_token_id or 0)
        self._initial_slots = initial_slots
        self._pools: dict[PoolKey, StackedPool] = {}
        self._routes: dict[PoolKey, torch.Tensor] = {}  # pool key → [task capacity] pool slot (CPU)
        self._task_capacity = 0
        self._grow_tasks(initial_slots)
        self._lock = threading.RLock()

    # ----- bookkeeping ---------------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        return sum(p.allocated_nbytes for p in self._pools.values())

    def _grow_tasks(self, capacity: int) -> None:
        old = self._task_capacity
        for key, route in self._routes.items():
            self._routes[key] = torch.cat([route, torch.zeros(capacity - old, dtype=torch.long)])
        self._task_capacity = capacity

    def _pool(self, component: Component) -> StackedPool:
        key = component.key
        if key not in self._pools:
            self._pools[key] = StackedPool(component.fields, self._initial_slots, pool_dtype(component, self.dtype),
                                           self.device)
            self._routes[key] = torch.zeros(self._task_capacity, dtype=torch.long)
        return self._pools[key]

    # ----- load / unload ---------------------------------------------------------------------------
    def load(self, adapter: TaskAdapter, sha256: str | None = None, task: int | None = None,
             outside_budget: bool = False, blob: bytes | None = None) -> ResidentTask:
        """Validate and copy a task into free slots; raises CapacityError past the byte budget.

        sha256, blob: the adapter's content hash and file if known (unused here; a process engine replays
        by the hash and sends the file to its workers).
        task: the task slot to use (an engine worker mirrors the slots its front process assigns);
        default: any free one. outside_budget: a built-in task of the server's (the embedding head),
        neither counted against `max_adapter_bytes` nor among the resident adapters."""
        adapter.validate(self.spec)
        parts = self.components(adapter)
        nbytes = resident_nbytes(parts, self.dtype)
        with self._lock:
            task = self.books.book(nbytes, tuple(c.key for c in parts), slot=task, outside_budget=outside_budget,
                                   sha256=sha256).slot
            while task >= self._task_capacity:
                self._grow_tasks(self._task_capacity * 2)
            written: list[PoolKey] = []
            try:
                for component in parts:
                    pool = self._pool(component)
                    slot = pool.allocate()
                    self._routes[component.key][task] = slot
                    written.append(component.key)
                    pool.set_slot(slot, component.values)
            except BaseException:  # e.g. out of memory while growing a pool: leave nothing half-loaded
                for key in written:
                    self._pools[key].reset_slot(int(self._routes[key][task]))
                    self._routes[key][task] = 0
                self.books.release(task)
                raise
            return ResidentTask(slot=task, num_labels=adapter.num_labels, nbytes=nbytes,
                                temperature=adapter.head.temperature)

    def unload(self, task: int) -> None:
        """Free a task's slots; a pool no resident task uses any more is released with its memory, so
        uploads of ever-new shapes (label counts, widths) cannot grow memory or slow the forward."""
        released = False
        with self._lock:
            for key in self.books.release(task).pools:
                route = self._routes[key]
                pool = self._pools[key]
                pool.reset_slot(int(route[task]))
                route[task] = 0
                if pool.used_slots == 0:
                    del self._pools[key], self._routes[key]
                    released = True
        if released and self.device.type == "cpu":
            memory.trim()

    def is_resident(self, task: int) -> bool:
        return task in self.books

    # ----- forward ---------------------------------------------------------------------------------
    def used_rows(self, pool_slots: torch.Tensor) -> torch.Tensor | None:
        """Row indices that use a pool (None = every row), on the engine's device."""
        used = pool_slots > 0
        if bool(used.all()):
            return None
        return to_device(used.nonzero().squeeze(1), self.device)

    def batch_params(self, task_slots: torch.Tensor) -> BatchParams:
        """Gather every row's parameters from the pools its tasks use. task_slots: [B] long on the CPU."""
        parts: dict[str, object] = {}
        keys = dict.fromkeys(key for t in torch.unique(task_slots).tolist() for key in self.books.pools_of(t))
        for key in keys:  # only the pools of this chunk's tasks, however many other shapes are resident
            slots = self._routes[key].index_select(0, task_slots)
            kind = KINDS_BY_NAME[str(key[0])]
            parts[kind.name] = kind.gather(parts.get(kind.name), key, self._pools[key], slots, self)
        return BatchParams(parts, task_slots=task_slots)

    def chunks(self, attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        return plan_chunks(attention_mask, self.chunk_rows)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_slots: torch.Tensor) -> torch.Tensor:
        """Logits [B, C_max] (float32, -inf past each row's label count) for a batch mixing tasks.

        The engine lock is held only while a chunk's parameters are gathered (copies), not while it
        computes, so loads and unloads of other tasks wait milliseconds, not a whole batch. The caller
        must keep the batch's tasks resident until this returns (the registry's leases do).
        """
        task_slots = task_slots.to("cpu", torch.long)
        input_ids, attention_mask = input_ids.cpu(), attention_mask.cpu()
        with self._lock:
            for t in torch.unique(task_slots).tolist():
                if t not in self.books:
                    raise KeyError(f"task slot {t} is not resident")
        plan = self.chunks(attention_mask)
        if len(plan) == 1:
            rows, width = plan[0]
            return self._forward_chunk(input_ids[:, :width], attention_mask[:, :width], task_slots)
        parts = [(rows, self._forward_chunk(input_ids[rows, :width], attention_mask[rows, :width],
                                            task_slots[rows])) for rows, width in plan]
        out = torch.full((len(task_slots), max(p.shape[1] for _, p in parts)), float("-inf"),
                         device=parts[0][1].device)
        for rows, logits in parts:
            out[to_device(rows, out.device), : logits.shape[1]] = logits
        return out

    def _forward_chunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       task_slots: torch.Tensor) -> torch.Tensor:
        with self._lock:
            params = self.batch_params(task_slots)
        return encoder_forward(self.model, to_device(input_ids, self.device), to_device(attention_mask, self.device),
                               params)

    @torch.inference_mode()
    def bare_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The backbone alone through the same code path (used by tests and benchmarks)."""
        return encode(self.model, to_device(input_ids, self.device), to_device(attention_mask, self.device),
                      BatchParams())

    def warm_up(self, rows: int = 8, length: int = 64) -> tuple[int, float]:
        """Run the backbone twice on a dummy batch: the first call warms kernels up, the second measures
        (tokens, seconds), which seed the batcher's admission control before any real batch ran."""
        ids = torch.full((rows, length), self.pad_id + 1, dtype=torch.long)
        mask = torch.ones_like(ids)
        self.bare_hidden(ids, mask)
        start = time.perf_counter()
        self.bare_hidden(ids, mask)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return rows * length, time.perf_counter() - start

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        ids, mask = tokenize(self.backbone.tokenizer, texts, max_length or self.spec.max_length)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}



