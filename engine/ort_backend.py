"""ONNX Runtime adapter (CPU and CUDA EP): sessions, and I/O bound once to sdrt's buffers.

CUDA EP: every session runs on sdrt's stream (user_compute_stream) and never syncs on its own
(disable_synchronize_execution_providers), so ORT runs queue behind each other like engine
enqueues, and sdrt captures the step runs in its own CUDA graphs, as for TensorRT (ORT's
enable_cuda_graph is not used: before microsoft/onnxruntime#28686 its replay synced the host
after every launch). Sessions get static shapes (free-dimension overrides), so no Memcpy nodes.
"""
from __future__ import annotations

from pathlib import Path

from sdrt.contract import Dims, Model
from sdrt.errors import UserError

ORT_DTYPES = {"float32": "float", "float16": "float16", "int32": "int32"}


def import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("ONNX Runtime is not installed: pip install 'sdrt[onnxruntime]' "
                        "(or 'sdrt[onnxruntime-gpu]' for CUDA)") from None
    return onnxruntime


def cuda_ep_available() -> bool:
    try:
        return "CUDAExecutionProvider" in import_ort().get_available_providers()
    except UserError:
        return False


class OrtBackend:
    def __init__(self, device: str, stream=None):
        self.ort = import_ort()
        self.device, self.stream = device, stream
        self.name = f"onnxruntime-{device}"
        if device == "cuda" and not cuda_ep_available():
            raise UserError("onnxruntime-cuda: this ONNX Runtime has no CUDAExecutionProvider: "
                            "pip install 'sdrt[onnxruntime-gpu]' (and uninstall plain onnxruntime)")

    def load(self, model: Model, path: Path, dims: Dims, weights: dict | None = None) -> "OrtModel":
        """weights: {initializer: array} that replace the graph's own at session creation (LoRA)."""
        ort = self.ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (weights or {}).values()]
        if values:  # ORT's external-initializer override; the values must outlive the session
            opts.add_external_initializers(list(weights), values)
        providers = ["CPUExecutionProvider"]
        if self.device == "cuda":
            for t in model.tensors:  # static shapes: every node stays on the CUDA EP
                for d in t.shape:
                    if isinstance(d, str):
                        opts.add_free_dimension_override_by_name(d, dims[d])
            cuda_opts = {"device_id": "0", "user_compute_stream": str(self.stream.ptr)}
            providers = [("CUDAExecutionProvider", cuda_opts)]
        try:
            sess = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile...)
            raise UserError(f"cannot load {path}: {str(e).splitlines()[0][:300]} "
                            "(missing or corrupt: run `sdrt export` again)") from None
        return OrtModel(self, model, sess, (values, weights))


class OrtModel:
    def __init__(self, backend: OrtBackend, model: Model, sess, keep=()):
        self.backend, self.model, self.sess = backend, model, sess
        self._keep = keep  # override tensors the session reads

    def bind(self, buffers: dict, shapes: dict) -> "OrtBinding":
        """Bind every I/O tensor of the model to its buffer, once."""
        io = self.sess.io_binding()
        dev = self.backend.device
        for t in self.model.inputs:
            b = buffers[t.name]
            io.bind_input(t.name, dev, 0, b.dtype, list(shapes[t.name]), b.ptr)
        for t in self.model.outputs:
            b = buffers[t.name]
            io.bind_output(t.name, dev, 0, b.dtype, list(shapes[t.name]), b.ptr)
        opts = self.backend.ort.RunOptions()
        if dev == "cuda":
            opts.add_run_config_entry("disable_synchronize_execution_providers", "1")
        return OrtBinding(self.sess, io, opts)


class OrtBinding:
    def __init__(self, sess, io, opts):
        self.sess, self.io, self.opts = sess, io, opts

    def run(self) -> None:
        self.sess.run_with_iobinding(self.io, self.opts)
