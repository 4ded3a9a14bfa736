"""The GPU half on a real GPU: the whole Pipeline on each GPU backend against ONNX Runtime on the
CPU (PSNR), the step captured as a CUDA graph (asserted, and which path), DeviceBuffer round trips
and the CUDA-event clock. Each test skips with the reason `sdrt doctor` gives when it cannot run."""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from sdrt import doctor
from sdrt.engine import cuda

pytestmark = pytest.mark.gpu
MIN_DB = {"fp32": 50.0, "fp16": 40.0}


def need_gpu() -> None:
    if not cuda.available():
        pytest.skip(f"needs an NVIDIA GPU ({doctor.gpu_problem(doctor.cuda_environment())})")


def need_backend(name: str) -> None:
    need_gpu()
    st = doctor.backend_status(name, doctor.cuda_environment())
    if not st["usable"]:
        pytest.skip(st["why"])


def generate(work, backend: str, batch: int = 2):
    from sdrt.engine.pipeline import Pipeline
    lat = np.random.default_rng(7).standard_normal((batch, 4, 8, 8), dtype=np.float32)
    pipe = Pipeline(work, backend=backend, ort_fusion=backend != "onnxruntime-cpu")
    first = pipe.generate("a red fox", "blurry", steps=6, height=64, width=64, batch=batch, latents=lat)
    again = pipe.generate("a red fox", "blurry", steps=6, height=64, width=64, batch=batch, latents=lat)
    return pipe, first, again


def host_waited(pipe, n: int = 200) -> bool:
    """Whether n step launches left the stream idle (each launch waited for the GPU) rather than
    queued: an informative probe, printed, since a tiny step may finish before the host looks."""
    plan = next(iter(pipe.plans.values()))
    pipe.backend.stream.sync()
    for i in range(n):
        plan.steps[i % 2].run()
    err = cuda.rt().cudaStreamQuery(pipe.backend.stream.handle)[0]
    pipe.backend.stream.sync()
    return int(err) == 0


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnxruntime_cuda_matches_cpu_and_captures_the_step(precision, request):
    need_backend("onnxruntime-cuda")
    work = request.getfixturevalue(f"tiny_{precision}")
    _, ref, _ = generate(work, "onnxruntime-cpu")
    pipe, got, again = generate(work, "onnxruntime-cuda")
    p = doctor.psnr(got.images, ref.images)
    assert p >= MIN_DB[precision], p
    np.testing.assert_array_equal(again.images, got.images)          # replayed graphs: same image
    assert got.timings["graph"] in ("sdrt", "onnxruntime"), got.timings["graph_error"]
    # shown with -s: which graph path ran, and whether the host waited on each launch
    print(f"\n  onnxruntime-cuda {precision}: PSNR {p:.1f} dB, step graph {got.timings['graph']}"
          f" ({got.timings['graph_error'] or 'sdrt captured it'}), host waited on replay: {host_waited(pipe)}")


def test_onnxruntime_own_cuda_graph_mode(request, monkeypatch):
    """ORT's enable_cuda_graph path on its own (sdrt's capture made to fail): same image, one
    graph per ping-pong binding on sdrt's stream."""
    need_backend("onnxruntime-cuda")
    tiny_fp16 = request.getfixturevalue("tiny_fp16")      # after the skip: no export on CPU
    _, ref, _ = generate(tiny_fp16, "onnxruntime-cpu")
    monkeypatch.setattr(cuda, "capture_or_run", lambda stream, run, warmups: cuda.Launch(run, "none", "forced off"))
    pipe, got, again = generate(tiny_fp16, "onnxruntime-cuda")
    assert (got.timings["graph"], got.timings["graph_error"]) == ("onnxruntime", "forced off")
    assert doctor.psnr(got.images, ref.images) >= MIN_DB["fp16"]
    np.testing.assert_array_equal(again.images, got.images)
    # shown with -s: which graph path ran, and whether the host waited on each launch
    print(f"\n  ORT enable_cuda_graph: host waited on replay: {host_waited(pipe)}")


def build_and_run(name: str, work_src, tmp_path):
    from sdrt.export.build import build
    work = tmp_path / "work"
    shutil.copytree(work_src, work)
    build(work, name, height=64, width=64, batch=2, progress=False)
    _, ref, _ = generate(work, "onnxruntime-cpu")
    pipe, got, again = generate(work, name)
    p = doctor.psnr(got.images, ref.images)
    assert p >= MIN_DB["fp16"], p
    np.testing.assert_array_equal(again.images, got.images)
    assert got.timings["graph"] == "sdrt", got.timings["graph_error"]
    assert pipe.backend.activation_bytes > 0


def test_tensorrt_rtx_matches_cpu(request, tmp_path):
    need_backend("tensorrt-rtx")
    build_and_run("tensorrt-rtx", request.getfixturevalue("tiny_fp16"), tmp_path)


def test_tensorrt_matches_cpu(request, tmp_path):
    need_backend("tensorrt")
    build_and_run("tensorrt", request.getfixturevalue("tiny_fp16"), tmp_path)


def test_device_buffer_round_trip():
    need_gpu()
    from sdrt.engine.buffers import DeviceBuffer
    stream = cuda.Stream()
    a, b = DeviceBuffer((3, 5), "float32", stream), DeviceBuffer((3, 5), "float32", stream)
    np.testing.assert_array_equal(a.read(), np.zeros((3, 5), np.float32))   # zeroed at allocation
    x = np.arange(15, dtype=np.float32).reshape(3, 5)
    a.write(x)
    a.write(x * 2)            # a second write waits for the first upload from the staging buffer
    b.copy_from(a)
    np.testing.assert_array_equal(b.read(), x * 2)


def test_cuda_event_clock_measures_device_time():
    need_gpu()
    from sdrt.engine.timing import Clock
    stream = cuda.Stream()
    nbytes = 256 << 20
    ptr = cuda.malloc(nbytes)
    try:
        clock = Clock(stream)
        clock.mark("start")
        for _ in range(20):
            cuda.memset_zero(ptr, nbytes, stream)   # ~5 GB written: milliseconds on any GPU
        clock.mark("memset")
        t0 = time.perf_counter()
        stream.sync()
        (label, ms), = clock.durations_ms()
        assert label == "memset" and 0 < ms < 10_000
        assert time.perf_counter() - t0 < 10
    finally:
        cuda.free(ptr)
