"""The per-step cost of ControlNet on one backend: the step with the export's ControlNets against the
step without, in the same process, alternating (A B A B ...) so that a noisy machine slows both
alike; the ratio of the medians is the figure.

    python -m sdrt.benchmarks.controlnet_cost WORK_DIR [OUT.json]

(ONNX Runtime CPU, 256x384, 4 steps per generation, 3 rounds; the README's figure.)

WORK_DIR: an export with ControlNets (`sdrt export MODEL WORK_DIR --controlnet CN_DIR`).
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from sdrt.engine.pipeline import Pipeline
from sdrt.fileio import write_json_atomic

PROMPT = "a lighthouse on a cliff at dusk"


def lines(h: int, w: int) -> np.ndarray:
    """A fixed edge-map-like conditioning image."""
    a = np.zeros((h, w, 3), np.uint8)
    a[::16], a[:, ::24] = 255, 255
    return a


def measure(work_dir: Path, backend: str, h: int, w: int, steps: int, rounds: int) -> dict:
    pipe = Pipeline(work_dir, backend=backend)
    n = pipe.config.controlnets
    control = [lines(h, w)] * n
    run = {"without": lambda: pipe.generate(PROMPT, steps=steps, height=h, width=w, seed=0),
           "with": lambda: pipe.generate(PROMPT, steps=steps, height=h, width=w, seed=0, control=control)}
    for f in run.values():                 # warm-up: sessions and bindings made
        f()
    per_step = {k: [] for k in run}
    for _ in range(rounds):
        for k, f in run.items():
            per_step[k] += f().timings["steps_ms"]
    med = {k: float(np.median(v)) for k, v in per_step.items()}
    return {"backend": backend, "controlnets": n, "size": f"{h}x{w}", "steps": steps, "rounds": rounds,
            "step_ms_median": med, "step_ms_min": {k: float(np.min(v)) for k, v in per_step.items()},
            "ratio_with_over_without": med["with"] / med["without"], "machine": platform.machine()}


BACKEND, SIZE, STEPS, ROUNDS = "onnxruntime-cpu", (256, 384), 4, 3
DEVICE = "2 CPU cores, ONNX Runtime CPU"


def main(work_dir: Path, out: Path = Path("benchmarks/results/controlnet-cost-cpu-tiny.json")) -> dict:
    r = {**measure(work_dir, BACKEND, *SIZE, STEPS, ROUNDS), "device": DEVICE}
    write_json_atomic(out, r)
    print(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    import sys
    main(*map(Path, sys.argv[1:]))
