"""Per-stage timings: CUDA events on the working stream (GPU) or host clocks (CPU).

Marks are recorded as the work is enqueued; durations are read once at the end, after the one
sync the pipeline does anyway, so timing adds no sync inside the loop.
"""
from __future__ import annotations

import time

from sdrt.engine import cuda


class Clock:
    def __init__(self, stream=None):
        self.stream = stream
        self.marks: list[tuple[str, object]] = []

    def mark(self, label: str) -> None:
        """Record the end of stage `label` (and the start of the next)."""
        if self.stream is None:
            self.marks.append((label, time.perf_counter()))
        else:
            ev = cuda.Event()
            ev.record(self.stream)
            self.marks.append((label, ev))

    def durations_ms(self) -> list[tuple[str, float]]:
        """[(label, ms)] for every mark after the first; call after the stream is synced."""
        out = []
        for (_, a), (label, b) in zip(self.marks, self.marks[1:]):
            out.append((label, b.ms_since(a) if self.stream is not None else (b - a) * 1e3))
        return out
