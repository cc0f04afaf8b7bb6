"""Preallocated stacked tensors for one component shape (vLLM-style LoRA slots).

Slot 0 always holds the identity (ones, zeros, or the backbone's own values), so rows that do not use
a component can gather slot 0 and come out unchanged.
"""

from __future__ import annotations

import torch


class StackedPool:
    def __init__(self, fields: dict[str, tuple[tuple[int, ...], float | torch.Tensor]], capacity: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        """fields: name → (shape of one slot, identity fill as a scalar or a tensor of that shape)."""
        self._fields = fields
        self._dtype = dtype
        self._device = device
        self.tensors: dict[str, torch.Tensor] = {}
        self._free: list[int] = []
        self._capacity = 0
        self._grow(max(2, capacity))

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used_slots(self) -> int:
        return self._capacity - 1 - len(self._free)

    @property
    def slot_nbytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.tensors.values())

    @property
    def allocated_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def _identity(self, name: str) -> torch.Tensor:
        shape, fill = self._fields[name]
        if isinstance(fill, torch.Tensor):
            return fill.to(self._device, self._dtype).reshape(shape)
        return torch.full(shape, float(fill), dtype=self._dtype, device=self._device)

    def _grow(self, new_capacity: int) -> None:
        """New rows are left uninitialised: a slot is written by `set_slot` before any route points at
        it, so on the CPU untouched capacity costs address space, not resident memory."""
        old = self._capacity
        for name, (shape, _) in self._fields.items():
            grown = torch.empty((new_capacity, *shape), dtype=self._dtype, device=self._device)
            if old:
                grown[:old] = self.tensors[name]
            else:
                grown[0] = self._identity(name)
            self.tensors[name] = grown
        self._free.extend(range(new_capacity - 1, max(old, 1) - 1, -1))
        self._capacity = new_capacity

    def allocate(self) -> int:
        """A free slot index ≥ 1; the pool doubles when full (amortised, only on loads)."""
        if not self._free:
            self._grow(self._capacity * 2)
        return self._free.pop()

    def set_slot(self, index: int, values: dict[str, torch.Tensor]) -> None:
        if index <= 0:
            raise ValueError("slot 0 is the identity and cannot be written")
        for name, (shape, _) in self._fields.items():
            self.tensors[name][index].copy_(values[name].reshape(shape))

    def reset_slot(self, index: int) -> None:
        """Onto the free list. Nothing routes to a free slot, so its stale values are never read."""
        if index <= 0:
            raise ValueError("slot 0 is the identity and cannot be freed")
        if index in self._free:
            raise ValueError(f"slot {index} is already free")
        self._free.append(index)

    def gather(self, name: str, slots: torch.Tensor) -> torch.Tensor:
        return self.tensors[name].index_select(0, slots)
