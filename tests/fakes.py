"""A fake engine for driving the registry and the batcher in-process, without a model.

Its logits are a pure function of (slot, input row), so a test can tell from each answer which slot
and which input produced it: logits[r, c] = 1000·slot + Σ input_ids[r] + c.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from switchboard.server.core.adapter import TaskAdapter
from switchboard.server.core.backbone import BackboneSpec
from switchboard.server.core.books import BooksView, SlotBooks
from switchboard.server.core.engine import CapacityError, ResidentTask


def expected_logits(slot: int, input_ids: torch.Tensor, width: int) -> torch.Tensor:
    return 1000.0 * slot + input_ids.sum(-1, keepdim=True).float() + torch.arange(width, dtype=torch.float32)


@dataclass
class FakeEngine(BooksView):
    spec: BackboneSpec
    max_adapter_bytes: int = 1 << 30
    width: int = 8
    pad_id: int = 0
    fail_with: BaseException | None = None  # the next forward raises this (once)
    gate: threading.Event | None = None  # when set, forward waits for it (to hold a batch in flight)
    batches: list[list[int]] = field(default_factory=list)  # slots of each forward, in order
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.books = SlotBooks(self.max_adapter_bytes)

    def load(self, adapter: TaskAdapter, sha256: str | None = None, blob: bytes | None = None) -> ResidentTask:
        adapter.validate(self.spec)
        booking = self.books.book(adapter.nbytes, sha256=sha256)
        return ResidentTask(booking.slot, adapter.num_labels, adapter.nbytes)

    def check_fits(self, adapter: TaskAdapter) -> int:
        if adapter.nbytes > self.max_adapter_bytes:
            raise CapacityError("larger than the fake budget")
        return adapter.nbytes

    def unload(self, task: int) -> None:
        self.books.release(task)

    def is_resident(self, slot: int) -> bool:
        return slot in self.books

    def chunks(self, attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        return [(torch.arange(attention_mask.shape[0]), attention_mask.shape[1])]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_slots: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            self.gate.wait(30)
        slots = task_slots.tolist()
        with self._lock:
            missing = [s for s in slots if s not in self.books]
            self.batches.append(slots)
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        if missing:
            raise KeyError(f"slots {missing} are not resident")
        return torch.stack([expected_logits(s, input_ids[r], self.width) for r, s in enumerate(slots)])
