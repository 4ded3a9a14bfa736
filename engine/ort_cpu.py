"""ONNX Runtime on the CPU: host buffers, one session per model serving every shape plan."""
from __future__ import annotations

from pathlib import Path

from sdrt.contract import Dims
from sdrt.engine.cuda import Launch
from sdrt.engine.ort_session import OrtBackend, OrtBinding


class OrtCpu(OrtBackend):
    device = "cpu"
    max_plans = None
    activation_bytes = None   # ONNX Runtime plans its arenas itself: no figure before running

    def __init__(self, work_dir: Path, manifest: dict, variant: str | None):
        """variant: "ort" runs onnx/ort/ (ORT's attention fusion), None the plain export."""
        super().__init__("onnxruntime-cpu", work_dir, manifest, variant)

    def session_dims(self, dims: Dims) -> None:
        return None               # dynamic shapes: one session serves every plan

    def launcher(self, binding: OrtBinding) -> Launch:
        return Launch(binding.run, "none", "CPU backend: no CUDA graphs")
