"""The step's CUDA graph paths on ONNX Runtime CUDA, without a GPU: a stand-in onnxruntime records
sessions, provider options, bindings and run options; sdrt's capture is made to succeed or fail."""
from __future__ import annotations

import types


from sdrt import contract
from sdrt import manifest as mf
from sdrt.contract import Dims
from sdrt.engine import cuda, ort_cuda

CFG = contract.ModelConfig(text_len=8, text_dim=16, vocab_size=64, sample_size=8)
STEP = contract.denoise_step(CFG, "fp16", guidance=True)
DIMS = Dims(1, 64, 64)


class FakeOrt:
    """Just enough of onnxruntime's Python API to open sessions, bind and run."""

    def __init__(self, fail_graph_mode=None):
        self.sessions, self.fail_graph_mode = [], fail_graph_mode
        ort = self

        class SessionOptions:
            def __init__(self):
                self.overrides = {}

            def add_free_dimension_override_by_name(self, name, value):
                self.overrides[name] = value

        class RunOptions:
            def __init__(self):
                self.entries = {}

            def add_run_config_entry(self, key, value):
                self.entries[key] = value

        class IOBinding:
            def __init__(self):
                self.bound = {}

            def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
                self.bound[name] = buffer_ptr

            bind_output = bind_input

        class InferenceSession:
            def __init__(self, path, opts, providers):
                self.providers, self.runs = providers, []
                graph = providers[0][1].get("enable_cuda_graph") == "1"
                if graph and ort.fail_graph_mode:
                    raise RuntimeError(ort.fail_graph_mode)
                ort.sessions.append(self)

            def io_binding(self):
                return IOBinding()

            def run_with_iobinding(self, io, opts):
                self.runs.append(dict(opts.entries))

        self.SessionOptions, self.RunOptions, self.InferenceSession = SessionOptions, RunOptions, InferenceSession
        self.GraphOptimizationLevel = types.SimpleNamespace(ORT_ENABLE_ALL=99)


class Buf:
    def __init__(self, ptr):
        self.ptr, self.dtype = ptr, "float32"


def backend(monkeypatch, ort, capture_error=None):
    """An OrtCuda with a stand-in stream; sdrt's capture fails with `capture_error` when given."""
    be = object.__new__(ort_cuda.OrtCuda)
    be.ort, be.stream, be.work_dir, be.variant = ort, types.SimpleNamespace(ptr=1234, sync=lambda: None), None, None
    be.manifest, be.name, be.sessions, be.capture_failed, be.weights = {}, "onnxruntime-cuda", {}, {}, {}
    monkeypatch.setattr(mf, "onnx_path", lambda *a: "step.onnx")

    def capture_or_run(stream, run, warmups):
        for _ in range(warmups):
            run()
        if capture_error:
            return cuda.Launch(run, "none", f"CUDA graph capture failed: {capture_error}")
        return cuda.Launch(lambda: None, "sdrt")
    monkeypatch.setattr(cuda, "capture_or_run", capture_or_run)
    return be


def bindings(be):
    runner = be.runner(STEP, DIMS)
    shapes = STEP.shapes(DIMS)
    out = []
    for k in (0, 1):
        bufs = {t.name: Buf(100 * k + i) for i, t in enumerate(STEP.tensors)}
        out.append(runner.bind(bufs, shapes))
    return out


def test_sdrt_capture_first(monkeypatch):
    ort = FakeOrt()
    be = backend(monkeypatch, ort)
    launches = [be.launcher(b) for b in bindings(be)]
    assert [l.graph for l in launches] == ["sdrt", "sdrt"] and not launches[0].error
    assert len(ort.sessions) == 1
    opts = ort.sessions[0].providers[0][1]
    assert opts == {"device_id": "0", "user_compute_stream": "1234"}      # no ORT graph mode
    assert ort.sessions[0].runs[0] == {"disable_synchronize_execution_providers": "1"}


def test_ort_graph_mode_when_sdrt_capture_fails(monkeypatch):
    ort = FakeOrt()
    be = backend(monkeypatch, ort, capture_error="operation not permitted when stream is capturing")
    plain = bindings(be)
    launches = [be.launcher(b) for b in plain]
    assert [l.graph for l in launches] == ["onnxruntime", "onnxruntime"]
    assert "operation not permitted when stream is capturing" in launches[0].error
    assert len(ort.sessions) == 2                       # one graph-mode session for both bindings
    graph_session = ort.sessions[1]
    assert graph_session.providers[0][1] == {"device_id": "0", "user_compute_stream": "1234",
                                             "enable_cuda_graph": "1"}
    assert be.sessions[("denoise_step_cfg", DIMS)].sess is graph_session   # it replaced the plain one
    ids = [r["gpu_graph_id"] for r in graph_session.runs]
    assert ids[:3] == ["1"] * 3 and ids[3:] == ["2"] * 3     # warm-up/capture per ping-pong graph
    assert all(r["disable_synchronize_execution_providers"] == "1" for r in graph_session.runs)
    launches[1].run()
    assert graph_session.runs[-1]["gpu_graph_id"] == "2"
    assert len(ort.sessions[0].runs) == 3                    # only sdrt's warm-ups ran plainly


def test_no_graph_when_both_fail(monkeypatch):
    ort = FakeOrt(fail_graph_mode="CUDA graph is not supported for this model: it has CPU nodes")
    be = backend(monkeypatch, ort, capture_error="cudaErrorStreamCaptureUnsupported")
    launch = be.launcher(bindings(be)[0])
    assert launch.graph == "none"
    assert "cudaErrorStreamCaptureUnsupported" in launch.error and "CPU nodes" in launch.error
    assert "ONNX Runtime's CUDA graph mode failed too" in launch.error


def test_capture_or_run_reports_the_capture_error(monkeypatch):
    """sdrt's own capture: a failure gives plain runs and CUDA's error string."""
    class Rt:
        cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=2)

        def cudaStreamBeginCapture(self, stream, mode):
            return (0,)

        def cudaStreamEndCapture(self, stream):
            return (901, None)   # cudaErrorStreamCaptureInvalidated

        def cudaGetErrorString(self, err):
            return 0, b"operation failed due to a previous error during capture"
    monkeypatch.setattr(cuda, "_rt", Rt())
    runs = []
    stream = types.SimpleNamespace(handle=1, sync=lambda: None)
    launch = cuda.capture_or_run(stream, lambda: runs.append(1), warmups=2)
    assert launch.graph == "none" and "previous error during capture" in launch.error
    launch.run()
    assert len(runs) == 4      # 2 warm-ups, the (failed) capture's enqueue, one plain run


def test_cpu_launch_says_no_graph(tiny_fp32):
    from sdrt.engine.pipeline import Pipeline
    pipe = Pipeline(tiny_fp32, backend="onnxruntime-cpu")
    t = pipe.generate("a fox", steps=2, height=64, width=64).timings
    assert (t["graph"], t["graph_error"]) == ("none", "CPU backend: no CUDA graphs") == pipe.graph


def test_capture_or_run_survives_the_runtimes_own_exception(monkeypatch):
    """onnxruntime raises its own Fail (an Exception, not a RuntimeError) when a run breaks the
    capture: still plain runs with the reason, and the capture is ended."""
    class Fail(Exception):
        pass
    ended = []

    class Rt:
        cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=2)

        def cudaStreamBeginCapture(self, stream, mode):
            return (0,)

        def cudaStreamEndCapture(self, stream):
            ended.append(stream)
            return (0, None)
    monkeypatch.setattr(cuda, "_rt", Rt())
    calls = []

    def run():
        calls.append(1)
        if len(calls) == 4:
            raise Fail("CUDA failure 900: operation not permitted when stream is capturing")
    launch = cuda.capture_or_run(types.SimpleNamespace(handle=1, sync=lambda: None), run, warmups=3)
    assert launch.graph == "none" and ended == [1]
    assert launch.error == "CUDA graph capture failed: Fail: CUDA failure 900: operation not permitted when stream is capturing"
