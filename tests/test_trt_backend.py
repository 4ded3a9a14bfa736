"""sdrt.engine.tensorrt without a GPU: a fake `tensorrt` module stands in for the real one."""
from __future__ import annotations

import enum
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from sdrt import contract
from sdrt.engine import engine_keys
from sdrt.engine import tensorrt as TB
from sdrt.errors import UserError

CFG = contract.ModelConfig(text_len=8, text_dim=16, vocab_size=64, sample_size=8)
MODEL = contract.vae_decoder(CFG, "fp16")  # latents [B,4,h,w] f32 -> image [B,3,H,W] f32


class Strategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT32 = 3


class FakeContext:
    def __init__(self, engine, strategy):
        self.engine, self.strategy = engine, strategy
        self.shapes, self.addresses, self.memory, self.runs = {}, {}, None, []

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if name == "image":  # what TensorRT would infer from the input
            b, _, h, w = self.shapes["latents"]
            return (b, 3, h * 8, w * 8)
        return self.shapes[name]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        self.runs.append(stream)
        return True


class OldContext(FakeContext):  # TensorRT 10.0: no set_device_memory(ptr, size)
    set_device_memory = None

    def __getattribute__(self, name):
        if name == "set_device_memory":
            raise AttributeError(name)
        return object.__getattribute__(self, name)


class FakeEngine:
    def __init__(self, names=("latents", "image"), memory=1000, profile=((1, 4, 8, 8), (1, 4, 8, 8), (2, 4, 16, 16)),
                 context=FakeContext):
        self.names, self.device_memory_size_v2, self.profile = names, memory, profile
        self.context_cls, self.contexts = context, []

    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_profile_shape(self, name, index):
        assert index == 0 and name == "latents"
        return [list(d) for d in self.profile]

    def get_tensor_dtype(self, name):
        return DataType.FLOAT

    def create_execution_context(self, strategy=Strategy.STATIC):
        ctx = self.context_cls(self, strategy)
        self.contexts.append(ctx)
        return ctx


class OldEngine(FakeEngine):  # TensorRT 10.0: device_memory_size only
    def __init__(self, memory, **kw):
        super().__init__(memory=memory, **kw)
        del self.device_memory_size_v2
        self.device_memory_size = memory


def fake_trt(engine, validity=None):
    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            return engine

    m = types.ModuleType("tensorrt")
    m.__version__ = "10.99.0"
    m.Logger, m.Runtime = Logger, Runtime
    m.ExecutionContextAllocationStrategy = Strategy
    m.nptype = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32}.__getitem__
    if validity is not None:
        class EngineValidity(enum.IntEnum):
            VALID = 0
            SUBOPTIMAL = 1
            INVALID = 2

        class Diag(enum.IntFlag):
            VERSION_MISMATCH = 1
            UNSUPPORTED_CC = 2
        m.EngineValidity, m.EngineInvalidityDiagnostics = EngineValidity, Diag
        Runtime.get_engine_validity = lambda self, data: (EngineValidity[validity[0]], validity[1])
    return m


class Buf:
    def __init__(self, shape, dtype="float32", ptr=0x1000):
        self.shape, self.dtype, self.ptr = tuple(shape), dtype, ptr


def bufs(b=1, h=8, w=8):
    return {"latents": Buf((b, 4, h, w), ptr=0x1000), "image": Buf((b, 3, h * 8, w * 8), ptr=0x2000)}


@pytest.fixture
def plan(tmp_path) -> Path:
    p = tmp_path / "vae_decoder.plan"
    p.write_bytes(b"plan")
    return p


def backend(monkeypatch, engine, validity=None):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(engine, validity))
    return TB.TensorRT("tensorrt", types.SimpleNamespace(ptr=77))


# ---- module names ------------------------------------------------------------------------------

def test_module_names(monkeypatch):
    mod = fake_trt(FakeEngine())
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    assert engine_keys.import_trt("tensorrt") == ("tensorrt", mod)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", mod)
    assert engine_keys.import_trt("tensorrt_rtx")[0] == "tensorrt-rtx"
    assert engine_keys.import_trt("tensorrt-rtx")[0] == "tensorrt-rtx"
    with pytest.raises(UserError, match="unknown backend 'onnxruntime': use one of tensorrt, tensorrt-rtx"):
        engine_keys.import_trt("onnxruntime")


def test_missing_module_names_pip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)  # import raises ImportError
    with pytest.raises(UserError, match=r"pip install 'sdrt\[tensorrt-rtx\]'"):
        TB.TensorRT("tensorrt-rtx", types.SimpleNamespace(ptr=0))


def test_adapter_does_not_import_torch():
    src = Path(TB.__file__).read_text()
    assert "import torch" not in src and "from torch" not in src


def test_engine_keys_and_backend_stay_lean():
    """The runtime's staleness check and TensorRT backend load without torch, onnx or the export package."""
    import subprocess
    code = ("import sys, sdrt.engine.engine_keys, sdrt.engine.tensorrt; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx') "
            "or m.startswith('sdrt.export')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- profiles and binding ----------------------------------------------------------------------

def test_check_profile():
    eng = FakeEngine()
    TB.check_profile(eng, "vae_decoder", "latents", (2, 4, 16, 8))
    for bad in [(3, 4, 8, 8), (1, 4, 4, 8), (1, 4, 8)]:
        with pytest.raises(UserError, match=r"latents shape .* outside the engine's profile \(min \(1, 4, 8, 8\), "
                                            r"opt \(1, 4, 8, 8\), max \(2, 4, 16, 16\)\)"):
            TB.check_profile(eng, "vae_decoder", "latents", bad)


def test_bind_sets_shapes_and_addresses_once_and_run_enqueues(monkeypatch, plan):
    eng = FakeEngine()
    model = backend(monkeypatch, eng).load(MODEL, plan)
    binding = model.bind(bufs(2, 16, 8), {})
    ctx = eng.contexts[0]
    assert ctx.strategy == Strategy.STATIC and ctx.memory is None
    assert ctx.shapes == {"latents": (2, 4, 16, 8)}
    assert ctx.addresses == {"latents": 0x1000, "image": 0x2000}
    binding.run()
    binding.run()
    assert ctx.runs == [77, 77] and ctx.addresses == {"latents": 0x1000, "image": 0x2000}


def test_bind_outside_profile(monkeypatch, plan):
    model = backend(monkeypatch, FakeEngine()).load(MODEL, plan)
    with pytest.raises(UserError, match=r"vae_decoder: latents shape \(4, 4, 8, 8\) is outside .* max \(2, 4, 16, 16\)"):
        model.bind(bufs(4), {})


def test_bind_checks_buffers(monkeypatch, plan):
    model = backend(monkeypatch, FakeEngine()).load(MODEL, plan)
    b = bufs()
    b["image"] = Buf((1, 3, 32, 32))
    with pytest.raises(UserError, match=r"buffer image is \(1, 3, 32, 32\) float32, the engine needs \(1, 3, 64, 64\)"):
        model.bind(b, {})
    b = bufs()
    b["latents"] = Buf((1, 4, 8, 8), "float16")
    with pytest.raises(UserError, match="buffer latents .* float16"):
        model.bind(b, {})


def test_shared_activation_memory(monkeypatch, plan):
    engines = [FakeEngine(memory=1000), FakeEngine(memory=5000), FakeEngine(memory=0)]
    be = backend(monkeypatch, None)
    models = []
    for e in engines:
        be.runtime.deserialize_cuda_engine = lambda data, e=e: e
        models.append(be.load(MODEL, plan))
    asked = []
    be.share_activation_memory(models, lambda n: asked.append(n) or 0xA000)
    assert asked == [5000]  # one block, the largest need
    assert be.activation_bytes == 5000   # what `sdrt bench` records as TensorRT's activation memory
    for m in models:
        m.bind(bufs(), {})
        m.bind(bufs(), {})  # ping-pong bindings share it too
    for e in engines:
        assert [c.strategy for c in e.contexts] == [Strategy.USER_MANAGED] * 2
        assert [c.memory for c in e.contexts] == [(0xA000, 5000)] * 2
    with pytest.raises(RuntimeError, match="before bind"):
        be.share_activation_memory(models, lambda n: 0)


def test_trt_10_0_memory_api(monkeypatch, plan):
    eng = OldEngine(memory=300, context=OldContext)
    be = backend(monkeypatch, eng)
    model = be.load(MODEL, plan)
    be.share_activation_memory([model], lambda n: 0xB000)
    model.bind(bufs(), {})
    ctx = eng.contexts[0]
    assert ctx.device_memory == 0xB000 and ctx.memory is None


# ---- loading -----------------------------------------------------------------------------------

def test_load_failures(monkeypatch, plan):
    with pytest.raises(UserError, match="cannot load engine .*rebuild"):
        backend(monkeypatch, None).load(MODEL, plan)
    with pytest.raises(UserError, match=r"has tensors \['image', 'x'\], the contract of vae_decoder"):
        backend(monkeypatch, FakeEngine(names=("x", "image"))).load(MODEL, plan)
    with pytest.raises(UserError, match=r"cannot run here \(VERSION_MISMATCH\): rebuild"):
        backend(monkeypatch, FakeEngine(), validity=("INVALID", 1)).load(MODEL, plan)
    with pytest.raises(UserError, match=r"cannot run here \(UNSUPPORTED_CC\): see the log"):
        backend(monkeypatch, FakeEngine(), validity=("INVALID", 2)).load(MODEL, plan)
    backend(monkeypatch, FakeEngine(), validity=("SUBOPTIMAL", 0)).load(MODEL, plan)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt_rtx not installed")
def test_real_rtx_module_loads(tmp_path):
    """The real module: runtime created; loading a plan with no GPU is a UserError, not a crash."""
    be = TB.TensorRT("tensorrt-rtx", types.SimpleNamespace(ptr=0))
    assert be.name == "tensorrt-rtx" and be.device == "cuda"
    p = tmp_path / "x.plan"
    p.write_bytes(b"\0" * 64)
    with pytest.raises(UserError):
        be.load(MODEL, p)



@pytest.mark.parametrize("version, form, warns", [
    ("1.24.4", "op", True), ("1.25.1", "op", False), ("1.31.1", "op", False),
    ("1.24.4", "decomposed", False), ("1.24.4", None, False)])
def test_ort_cuda_warns_when_attention_would_run_on_cpu(version, form, warns):
    import warnings
    from sdrt.engine.ort_cuda import warn_if_attention_on_cpu
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_attention_on_cpu(version, form)
    assert bool(caught) == warns
    if warns:
        assert "onnxruntime-gpu>=1.25" in str(caught[0].message) and "--attention decomposed" in str(caught[0].message)
