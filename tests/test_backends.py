"""Every backend is an sdrt.engine.backends.Backend (the interface the pipeline uses), on a
CPU-only machine: ONNX Runtime CPU for real, ONNX Runtime CUDA and TensorRT with stand-in
modules; and no backend keeps mutable state on its class."""
from __future__ import annotations

import contextlib
import inspect
import types

import pytest

from sdrt.engine import backends, cuda, ort_cuda, ort_session, tensorrt
from sdrt.engine.backends import Backend
from sdrt.engine.ort_cpu import OrtCpu

CLASSES = [OrtCpu, ort_cuda.OrtCuda, tensorrt.TensorRT]


def make(cls, monkeypatch, tmp_path):
    if cls is OrtCpu:
        return OrtCpu(tmp_path, {}, None)
    if cls is ort_cuda.OrtCuda:
        monkeypatch.setattr(ort_cuda, "cuda_ep_available", lambda: True)
        monkeypatch.setattr(cuda, "Stream", lambda: types.SimpleNamespace(ptr=1))
        return ort_cuda.OrtCuda(tmp_path, {}, "ort")
    logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt = types.SimpleNamespace(Runtime=lambda log: object(), Logger=logger)
    monkeypatch.setattr(tensorrt, "import_trt", lambda name: (name, trt))
    return tensorrt.TensorRT("tensorrt", types.SimpleNamespace(ptr=1))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_each_backend_is_a_backend(cls, monkeypatch, tmp_path):
    be = make(cls, monkeypatch, tmp_path)
    assert isinstance(be, Backend)
    for name, method in vars(Backend).items():   # same parameters as the interface states
        if inspect.isfunction(method) and not name.startswith("_"):
            want = list(inspect.signature(method).parameters)[1:]
            got = list(inspect.signature(getattr(be, name)).parameters)
            assert len(got) == len(want), (cls.__name__, name, got, want)
    assert be.device in ("cpu", "cuda") and (be.stream is None) == (be.device == "cpu")
    assert be.refits is (cls is tensorrt.TensorRT)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_no_mutable_class_attributes(cls):
    """State (sessions, LoRA weights, engines) lives on the instance: two pipelines never share it."""
    for klass in cls.__mro__[:-1]:
        for name, value in vars(klass).items():
            mutable = not name.startswith("__") and isinstance(value, (dict, list, set))
            assert not mutable, f"{klass.__name__}.{name} is a mutable class attribute"


def test_ort_backends_share_session_keys_and_weights(monkeypatch, tmp_path):
    """Both ONNX Runtime backends key sessions (model, dims or None) and take LoRA weights alike."""
    cpu, gpu = make(OrtCpu, monkeypatch, tmp_path), make(ort_cuda.OrtCuda, monkeypatch, tmp_path)
    dims = object()
    assert cpu.session_dims(dims) is None and gpu.session_dims(dims) is dims
    for be in (cpu, gpu):
        assert isinstance(be, ort_session.OrtBackend)
        be.sessions = {("unet", be.session_dims(dims)): "s1", ("vae_decoder", be.session_dims(dims)): "s2"}
        with pytest.warns(UserWarning, match="plain graphs") if be.variant else contextlib.nullcontext():
            be.set_weights({"unet": {"w": 1}})
        assert be.weights == {"unet": {"w": 1}} and "+" not in be.name
        assert list(be.sessions) == ([] if be is gpu else [("vae_decoder", None)])   # gpu: fused variant dropped
    assert OrtCpu(tmp_path, {}, None).weights == {}                                  # not shared


def test_open_backend_returns_a_backend(tmp_path):
    assert isinstance(backends.open_backend("onnxruntime-cpu", tmp_path, {}), Backend)
