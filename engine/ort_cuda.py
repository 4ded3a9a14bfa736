"""ONNX Runtime on the CUDA EP: device buffers, sessions per shape plan, the step in a CUDA graph.

Every session runs on sdrt's stream and never syncs on its own, so ORT runs queue behind each
other like engine enqueues. The step's whole-step graph, in order of preference:
  1. "sdrt":        sdrt captures run_with_iobinding in its own CUDA graph, as for TensorRT;
  2. "onnxruntime": where that capture fails (something inside Run syncs or allocates), a second
                    session of the step with ORT's own CUDA graph mode (enable_cuda_graph), one
                    graph per ping-pong binding (gpu_graph_id 1 and 2); it replaces the first
                    session, so the weights are held once. Before microsoft/onnxruntime#28686
                    its replay synced the host after every launch;
  3. "none":        plain runs; Launch.error holds both failures.
Pipeline.graph (and Result.timings["graph"]) says which path ran.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from sdrt.contract import Dims
from sdrt.engine import cuda
from sdrt.engine.engine_keys import major_minor
from sdrt.engine.ort_session import OrtBackend, OrtBinding, cuda_ep_available
from sdrt.errors import UserError, first_line

ORT_CUDA_ATTENTION = (1, 25)   # first onnxruntime-gpu with a CUDA kernel for ONNX's Attention op


def warn_if_attention_on_cpu(ort_version: str, attention_form: str | None) -> None:
    """Older ORT places the Attention op on the CPU: it still runs, slowly and without a graph."""
    if attention_form == "op" and major_minor(ort_version) < ORT_CUDA_ATTENTION:
        warnings.warn(f"onnxruntime {ort_version} has no CUDA kernel for ONNX's Attention op (it runs on the "
                      f"CPU, and the step cannot be captured): install onnxruntime-gpu>=1.25 or export with "
                      f"--attention decomposed")


class OrtCuda(OrtBackend):
    """Sessions per shape plan (static shapes: every node on the CUDA EP, no Memcpy). Each plan
    holds its own copy of the weights, so only the latest plan is kept."""
    device = "cuda"
    max_plans = 1
    activation_bytes = None   # ONNX Runtime plans its arenas itself: no figure before running

    def __init__(self, work_dir: Path, manifest: dict, variant: str | None):
        """variant: "ort" runs onnx/ort/ (ORT's attention fusion), None the plain export."""
        super().__init__("onnxruntime-cuda", work_dir, manifest, variant)
        if not cuda_ep_available():
            raise UserError("onnxruntime-cuda: this ONNX Runtime has no CUDAExecutionProvider: "
                            "pip install 'sdrt[onnxruntime-gpu]' (and uninstall plain onnxruntime)")
        warn_if_attention_on_cpu(self.ort.__version__, manifest.get("attention"))
        self.stream = cuda.Stream()
        self.capture_failed: dict[tuple[str, Dims], str] = {}   # why sdrt's capture failed, per session

    def session_dims(self, dims: Dims) -> Dims:
        return dims               # static shapes: a session per plan

    def launcher(self, binding: OrtBinding) -> cuda.Launch:
        key = (binding.session.model.name, binding.session.dims)
        if key not in self.capture_failed:
            # warm-ups grow ORT's arena and run cuDNN's algorithm search outside the capture
            launch = cuda.capture_or_run(self.stream, binding.run, warmups=3)
            if launch.graph == "sdrt":
                return launch
            self.capture_failed[key] = launch.error
        return self.ort_graph_launch(key, binding)

    def ort_graph_launch(self, key, binding: OrtBinding) -> cuda.Launch:
        """The binding again on a session in ORT's CUDA graph mode; plain runs if that fails too."""
        why = self.capture_failed[key]
        try:
            session = self.sessions[key]
            if not session.cuda_graph:   # one graph-mode session replaces the plain one
                session = self.open(session.model, session.dims, cuda_graph=True)
                self.sessions[key] = session
            session.graph_ids += 1
            graph_binding = session.bind(binding.buffers, binding.shapes, graph_id=session.graph_ids)
            for _ in range(3):   # ORT runs plainly first, then captures, then replays
                graph_binding.run()
            self.stream.sync()
        except Exception as e:  # UserError, ORT's own exception types, CUDA errors
            return cuda.Launch(binding.run, "none", f"{why}; ONNX Runtime's CUDA graph mode failed too: "
                                                    f"{first_line(e)[:300]}")
        return cuda.Launch(graph_binding.run, "onnxruntime", why)

    def drop_plans(self) -> None:
        super().drop_plans()
        self.capture_failed.clear()

    def set_weights(self, weights: dict) -> None:
        """LoRA: {model: {initializer: merged array}} for the sessions made from now on."""
        super().set_weights(weights)
        self.capture_failed.clear()   # new sessions: sdrt's capture is tried afresh
