"""ONNX Runtime on the CPU: host buffers, one session per model serving every shape plan."""
from __future__ import annotations

from pathlib import Path

from sdrt import manifest as mf
from sdrt.contract import Dims, Model
from sdrt.engine.cuda import Launch
from sdrt.engine.ort_session import OrtBinding, OrtSession, import_ort, open_session, replace_weights


class OrtCpu:
    device, stream = "cpu", None
    max_plans = None
    activation_bytes = None   # ONNX Runtime plans its arenas itself: no figure before running

    def __init__(self, work_dir: Path, manifest: dict, variant: str | None):
        """variant: "ort" runs onnx/ort/ (ORT's attention fusion), None the plain export."""
        self.ort = import_ort()
        self.work_dir, self.manifest, self.variant = work_dir, manifest, variant
        self.name = "onnxruntime-cpu" + ("+ort-fusion" if variant else "")
        self.weights: dict = {}   # {model: {initializer: array}} replacing the export's (LoRA)
        self.sessions: dict[str, OrtSession] = {}

    def runner(self, model: Model, dims: Dims) -> OrtSession:
        if model.name not in self.sessions:  # dynamic shapes: one session serves every plan
            path = mf.onnx_path(self.work_dir, model, self.manifest, self.variant)
            self.sessions[model.name] = open_session(self.ort, model, path, "cpu",
                                                     weights=self.weights.get(model.name))
        return self.sessions[model.name]

    def launcher(self, binding: OrtBinding) -> Launch:
        return Launch(binding.run, "none", "CPU backend: no CUDA graphs")

    def drop_plans(self) -> None:
        self.sessions.clear()

    refits = False            # LoRA: new sessions with overriding initializers, not in place
    weights: dict = {}        # LoRA: {model: {initializer: array}}; set_weights replaces it, never mutates

    def set_weights(self, weights: dict) -> None:
        """LoRA: {model: {initializer: merged array}} for the sessions made from now on."""
        replace_weights(self, weights)
