"""Pick and open one backend. Each backend is one module with one class (OrtCpu in ort_cpu.py,
OrtCuda in ort_cuda.py, TensorRT in tensorrt.py for tensorrt and tensorrt-rtx) that is a
`Backend` (below); the two ONNX Runtime ones share sdrt.engine.ort_session.OrtBackend.

The buffers, CUDA graphs and the loop are shared: buffers.py, cuda.py, pipeline.py.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol, runtime_checkable

from sdrt.contract import Dims, Model
from sdrt.engine import cuda
from sdrt.engine.ort_session import cuda_ep_available
from sdrt.errors import UserError

NAMES = ("tensorrt", "tensorrt-rtx", "onnxruntime-cuda", "onnxruntime-cpu")


class Binding(Protocol):
    """One model bound to sdrt's buffers, once."""

    def run(self) -> None:
        """Run (enqueue on the backend's stream) the model once; no host sync."""


class Runner(Protocol):
    """One loaded model (an ONNX Runtime session, a TensorRT engine)."""

    def bind(self, buffers: dict, shapes: dict) -> Binding:
        """Bind every I/O tensor of the model ({name: buffer with .ptr, .shape, .dtype}) at these
        shapes ({name: shape})."""


@runtime_checkable
class Backend(Protocol):
    """What the pipeline (and LoraState) use of a backend."""
    name: str                          # as the user names it, e.g. "onnxruntime-cpu+ort-fusion"
    device: str                        # "cpu" (host buffers) | "cuda" (device buffers)
    stream: cuda.Stream | None         # every run is enqueued here; None on the CPU
    max_plans: int | None              # shape plans kept at once (None: no limit)
    activation_bytes: int | None       # the engines' shared activation block; None: the runtime sizes it
    refits: bool                       # LoRA changes weights in place (True) or in new sessions (False)

    def runner(self, model: Model, dims: Dims) -> Runner:
        """The model loaded for a shape plan of these dims."""

    def launcher(self, binding: Binding) -> cuda.Launch:
        """How the step binding is launched: Launch.run runs one step; Launch.graph says which path
        (sdrt | onnxruntime | none) and Launch.error why not sdrt's own CUDA graph."""

    def drop_plans(self) -> None:
        """Forget what was loaded for earlier shape plans (before a new plan, max_plans reached)."""

    def set_weights(self, weights: dict) -> None:
        """LoRA: {model: {ONNX initializer: array}} to run with from now on (refits: in place)."""


def open_backend(name: str, work_dir: Path, manifest: dict, ort_fusion: bool = True) -> Backend:
    """ort_fusion: ONNX Runtime backends run onnx/ort/ (ORT's attention fusion) when exported."""
    variant = "ort" if ort_fusion and manifest.get("variants", {}).get("ort") else None
    if name == "auto":
        name = pick_auto(manifest)
    if name not in NAMES:
        raise UserError(f"unknown backend {name!r}: choose auto or one of {', '.join(NAMES)}")
    if name == "onnxruntime-cpu":
        from sdrt.engine.ort_cpu import OrtCpu
        return OrtCpu(work_dir, manifest, variant)
    if not cuda.available():
        extra = "onnxruntime-gpu" if name == "onnxruntime-cuda" else name
        raise UserError(f"backend {name} needs an NVIDIA GPU with cuda-python installed "
                        f"(pip install 'sdrt[{extra}]'); none was found ({cuda.why_unavailable() or 'no device'}): "
                        "use --backend onnxruntime-cpu")
    if name == "onnxruntime-cuda":
        from sdrt.engine.ort_cuda import OrtCuda
        return OrtCuda(work_dir, manifest, variant)
    from sdrt.engine.tensorrt import open_tensorrt
    return open_tensorrt(name, work_dir, manifest)


def pick_auto(manifest: dict) -> str:
    """TensorRT engines if built and runnable, else ONNX Runtime CUDA, else ONNX Runtime CPU."""
    if cuda.available():
        for name in ("tensorrt", "tensorrt-rtx"):
            if manifest.get("engines", {}).get(name) and _importable(name.replace("-", "_")):
                return name
        if cuda_ep_available():
            return "onnxruntime-cuda"
    return "onnxruntime-cpu"


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
