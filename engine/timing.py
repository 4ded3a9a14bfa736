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


def timing_table(t: dict) -> str:
    """Pipeline.generate's timings as a two-column table (for `sdrt generate --timings`, `sdrt demo`)."""
    steps = t["steps_ms"]
    rows = [("setup (first call)", t["setup_ms"]), ("tokenize", t["tokenize_ms"]), ("text encoder", t["text_encoder_ms"]),
            (f"denoise ({len(steps)} steps)", t["denoise_ms"]),
            ("  per step (median)", t["unet_step_ms"]),
            ("  per step (min / max)", f"{min(steps):.2f} / {max(steps):.2f}"),
            ("vae decoder", t["vae_ms"]), ("total", t["total_ms"])]
    lines = [f"backend: {t['backend']}", f"{'stage':<24}{'ms':>12}"]
    for name, v in rows:
        lines.append(f"{name:<24}{v if isinstance(v, str) else f'{v:.2f}':>12}")
    return "\n".join(lines)
