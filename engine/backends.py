"""Pick and open one backend. Each backend is one module with one class (OrtCpu in ort_cpu.py,
OrtCuda in ort_cuda.py, TensorRT in tensorrt.py for tensorrt and tensorrt-rtx) implementing

    name, device ("cpu" | "cuda"), stream (cuda.Stream or None), max_plans, activation_bytes
    runner(model, dims) -> loaded model; .bind(buffers, shapes) -> binding; binding.run()
    launcher(binding)   -> cuda.Launch: run() runs one step; graph says which path (sdrt |
                           onnxruntime | none) and error why not sdrt's own CUDA graph
    drop_plans()        -> forget what was loaded for earlier shape plans

The buffers, CUDA graphs and the loop are shared: buffers.py, cuda.py, pipeline.py.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from sdrt.engine import cuda
from sdrt.engine.ort_session import cuda_ep_available
from sdrt.errors import UserError

NAMES = ("tensorrt", "tensorrt-rtx", "onnxruntime-cuda", "onnxruntime-cpu")


def open_backend(name: str, work_dir: Path, manifest: dict, ort_fusion: bool = True):
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
