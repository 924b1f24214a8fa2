"""A small least-recently-used cache with hit/miss counters (the engine's per-instruction and per-observation
caches), bounded by an entry count and optionally by bytes.

With a byte budget, an entry's size is the bytes of the tensors in it. Room is made *before* computing a new
entry (evicting least recently used entries until the largest entry seen so far would fit), so the new entry's
tensors are never allocated on top of a full cache; an entry larger than the whole budget is returned uncached.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, Optional, TypeVar

import torch
from torch.utils._pytree import tree_flatten

V = TypeVar("V")


def tensor_bytes(value) -> int:
    """Bytes of the distinct tensor storages reachable from `value` (dataclasses, tuples, lists, dicts)."""
    seen, total = set(), 0
    stack = [value]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif hasattr(obj, "__dataclass_fields__"):
            stack.extend(getattr(obj, name) for name in obj.__dataclass_fields__)
        else:
            leaves, _ = tree_flatten(obj)
            if not (len(leaves) == 1 and leaves[0] is obj):
                stack.extend(leaves)
    return total


class LRUCache(Generic[V]):
    def __init__(self, capacity: int, max_bytes: Optional[int] = None):
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"cache max_bytes must be >= 0 or None, got {max_bytes}")
        self.capacity, self.max_bytes = capacity, max_bytes
        self.hits = self.misses = 0
        self.bytes = 0                      # held now (counted only with a byte budget)
        self.largest = 0                    # the largest entry seen, in bytes: the room made before a compute
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> tuple[V, bool]:
        """The cached value for key, else compute() (stored, evicting the least recently used). -> (value, hit)"""
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key], True
        self.misses += 1
        if self.max_bytes is not None:
            self._evict(self.max_bytes - min(self.largest, self.max_bytes), self.capacity - 1)
        value = compute()
        if self.capacity:
            size, bytes_left = 0, float("inf")
            if self.max_bytes is not None:
                size = tensor_bytes(value)
                self.largest = max(self.largest, size)
                if size > self.max_bytes:
                    return value, False
                bytes_left = self.max_bytes - size
            self._evict(bytes_left, self.capacity - 1)
            self._items[key], self._sizes[key] = value, size
            self.bytes += size
        return value, False

    def _evict(self, bytes_left: float, entries_left: int) -> None:
        """Drop least recently used entries until at most `bytes_left` bytes and `entries_left` entries remain."""
        while self._items and (self.bytes > bytes_left or len(self._items) > entries_left):
            key, _ = self._items.popitem(last=False)
            self.bytes -= self._sizes.pop(key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self._sizes.clear()
        self.bytes = 0
