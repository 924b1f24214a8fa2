"""Per-stage latency with device-synchronised timers.

GPU work is asynchronous: without a synchronisation at each stage boundary, a stage's kernels would be billed to
whichever later stage first waits on them. ``StageTimer`` synchronises the device before starting and before
stopping each stage's clock, so every stage's number is the time its own work took.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Optional

import torch


class StageTimer:
    def __init__(self, device: Optional[torch.device] = None):
        dev = torch.device(device) if device is not None else None
        self._sync = torch.cuda.synchronize if dev is not None and dev.type == "cuda" else None
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._sync:
            self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3


class NullTimer:
    """A timer that measures nothing (no synchronisation): the default when a caller does not ask for timings."""

    @property
    def ms(self) -> dict[str, float]:
        return {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield
