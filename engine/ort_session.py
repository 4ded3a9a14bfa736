"""What the two ONNX Runtime backends share: the module, one session per graph, I/O bound once.

    open_session(ort, model, path, device, stream, dims) -> OrtSession
    OrtSession.bind(buffers, shapes, graph_id) -> OrtBinding   IOBinding of every tensor to sdrt's buffers
    OrtBinding.run()                                    run_with_iobinding
    OrtBackend                                          sessions keyed (model, dims), LoRA weights

CUDA EP (device "cuda"): the session runs on sdrt's stream (user_compute_stream) and never syncs
on its own (disable_synchronize_execution_providers), and it gets static shapes (free-dimension
overrides from `dims`), so every node stays on the CUDA EP, with no Memcpy nodes.

ORT's own CUDA graph mode (cuda_graph=True: provider option enable_cuda_graph) captures a run
after a few plain ones and replays it on every later run; it needs static shapes and IOBinding at
fixed addresses (both hold here). One session holds one graph per "gpu_graph_id" run option, so
the two ping-pong bindings of the step get ids 1 and 2 (0 is ORT's default, -1 disables).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from sdrt import manifest as mf
from sdrt.contract import Dims, Model
from sdrt.errors import UserError, first_line


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


def cuda_provider_options(stream, cuda_graph: bool = False) -> dict:
    """CUDAExecutionProvider options: sdrt's stream, and ORT's own CUDA graph mode when asked."""
    opts = {"device_id": "0", "user_compute_stream": str(stream.ptr)}
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    return opts


def open_session(ort, model: Model, path: Path, device: str, stream=None, dims: Dims | None = None,
                 cuda_graph: bool = False, weights: dict | None = None) -> "OrtSession":
    """An InferenceSession of `path` on the CPU, or on the CUDA EP on `stream` with static `dims`
    (cuda_graph: ORT captures and replays the runs itself); weights: {initializer: array} that
    replace the graph's own at session creation (LoRA)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (weights or {}).values()]
    if values:  # ORT's external-initializer override; the arrays must outlive the session
        opts.add_external_initializers(list(weights), values)
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        for t in model.tensors:  # static shapes: every node stays on the CUDA EP
            for d in t.shape:
                if isinstance(d, str):
                    opts.add_free_dimension_override_by_name(d, dims[d])
        providers = [("CUDAExecutionProvider", cuda_provider_options(stream, cuda_graph))]
    try:
        sess = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile...)
        raise UserError(f"cannot load {path}: {first_line(e)[:300]} "
                        "(missing or corrupt: run `sdrt export` again)") from None
    return OrtSession(ort, model, sess, device, path, dims, cuda_graph, (values, weights))


class OrtBackend:
    """What OrtCpu and OrtCuda share: the ONNX Runtime module, the export variant they run, and
    sessions keyed (model name, dims or None) opened from the export with the LoRA weights of
    the moment. A subclass sets `device` and says which dims key a session (`session_dims`)."""
    device: str
    stream = None             # cuda.Stream on the CUDA EP
    refits = False            # LoRA: new sessions with overriding initializers, not in place

    def __init__(self, name: str, work_dir: Path, manifest: dict, variant: str | None):
        """variant: "ort" runs onnx/ort/ (ORT's attention fusion), None the plain export."""
        self.ort = import_ort()
        self.work_dir, self.manifest, self.variant = work_dir, manifest, variant
        self.name = name + ("+ort-fusion" if variant else "")
        self.weights: dict = {}   # {model: {initializer: array}} replacing the export's (LoRA)
        self.sessions: dict[tuple[str, Dims | None], OrtSession] = {}

    def session_dims(self, dims: Dims) -> Dims | None:
        """The dims a session is made for: None where one session serves every shape plan."""
        raise NotImplementedError

    def runner(self, model: Model, dims: Dims) -> "OrtSession":
        key = (model.name, self.session_dims(dims))
        if key not in self.sessions:
            self.sessions[key] = self.open(model, key[1])
        return self.sessions[key]

    def open(self, model: Model, dims: Dims | None, cuda_graph: bool = False) -> "OrtSession":
        path = mf.onnx_path(self.work_dir, model, self.manifest, self.variant)
        return open_session(self.ort, model, path, self.device, self.stream, dims,
                            cuda_graph=cuda_graph, weights=self.weights.get(model.name))

    def drop_plans(self) -> None:
        self.sessions.clear()

    def set_weights(self, weights: dict) -> None:
        """LoRA: {model: {initializer: merged array}} for the sessions made from now on. Drops the
        sessions whose weights change, so the next runner() call makes them anew from the export
        with the new overrides. The fused variant (onnx/ort/) has other initializers, so LoRA runs
        the plain graphs."""
        if self.variant and any(weights.values()):
            warnings.warn("LoRA runs the plain graphs (onnx/), not ONNX Runtime's fused variant (onnx/ort/)")
            self.variant, self.name, self.weights = None, self.name.split("+")[0], {}
            self.sessions.clear()
        for name in set(weights) | set(self.weights):
            if _differ(weights.get(name, {}), self.weights.get(name, {})):
                for key in [k for k in self.sessions if k[0] == name]:
                    del self.sessions[key]
        self.weights = {n: w for n, w in weights.items() if w}


def _differ(a: dict, b: dict) -> bool:
    return a.keys() != b.keys() or any(x is not b[k] and not np.array_equal(x, b[k]) for k, x in a.items())


class OrtSession:
    def __init__(self, ort, model: Model, sess, device: str, path: Path | None = None,
                 dims: Dims | None = None, cuda_graph: bool = False, keep=()):
        self.ort, self.model, self.sess, self.device = ort, model, sess, device
        self.path, self.dims, self.cuda_graph = path, dims, cuda_graph
        self.graph_ids = 0   # CUDA graphs handed out to bindings (cuda_graph sessions)
        self._keep = keep    # override tensors (LoRA) the session reads

    def bind(self, buffers: dict, shapes: dict, graph_id: int | None = None) -> "OrtBinding":
        """Bind every I/O tensor of the model to its buffer, once. graph_id: which of the
        session's CUDA graphs this binding's runs capture and replay (cuda_graph sessions)."""
        io = self.sess.io_binding()
        for t in self.model.inputs:
            b = buffers[t.name]
            io.bind_input(name=t.name, device_type=self.device, device_id=0, element_type=b.dtype,
                          shape=list(shapes[t.name]), buffer_ptr=b.ptr)
        for t in self.model.outputs:
            b = buffers[t.name]
            io.bind_output(name=t.name, device_type=self.device, device_id=0, element_type=b.dtype,
                           shape=list(shapes[t.name]), buffer_ptr=b.ptr)
        opts = self.ort.RunOptions()
        if self.device == "cuda":
            opts.add_run_config_entry("disable_synchronize_execution_providers", "1")
        if graph_id is not None:
            opts.add_run_config_entry("gpu_graph_id", str(graph_id))
        return OrtBinding(self, io, opts, buffers, shapes)


class OrtBinding:
    def __init__(self, session: OrtSession, io, opts, buffers: dict, shapes: dict):
        self.session, self.sess, self.io, self.opts = session, session.sess, io, opts
        self.buffers, self.shapes = buffers, shapes   # kept: the buffers live as long as the binding

    def run(self) -> None:
        self.sess.run_with_iobinding(self.io, self.opts)
