"""Timing one section of a criterion's forward (the assignment) without adding a host sync.

On CUDA two events are recorded around the section and read only when asked, after the caller has
synchronised anyway (the training loop does, to time the whole loss); on CPU a perf_counter pair.
Disabled (the default) it costs nothing, so criteria keep their "no host sync" property.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch


class SectionTimer:
    """``with timer(device): ...`` accumulates the section's time; ``pop_ms()`` returns and resets it."""

    def __init__(self) -> None:
        self.enabled = False
        self._cpu_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def __call__(self, device: torch.device) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t = time.perf_counter()
            yield
            self._cpu_s += time.perf_counter() - t

    def pop_ms(self) -> float:
        """Milliseconds timed since the last call (CUDA: the events must have completed — sync first)."""
        ms = 1000 * self._cpu_s + sum(start.elapsed_time(end) for start, end in self._events)
        self._cpu_s, self._events = 0.0, []
        return ms
