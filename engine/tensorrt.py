"""TensorRT / TensorRT-RTX backend: deserialize the plans `sdrt build` wrote, bind sdrt's device
buffers once, enqueue on sdrt's stream; the step enqueue is captured in a CUDA graph.

    TensorRT(name, stream)                  one IRuntime on one stream
      .load(model, plan) -> TrtEngine       an ICudaEngine checked against the model's contract
      .share_activation_memory(engines, alloc)
    TrtEngine.bind(buffers, shapes) -> TrtContext     an IExecutionContext, addresses set once
    TrtContext.run()                        execute_async_v3 on the stream (no sync)
    open_tensorrt(name, work_dir, manifest) the backend with every built engine loaded

Written against the documented TensorRT 10/11 and TensorRT-RTX 1.x Python API (same names in both;
the few differences live in `_memory_size` and `_set_memory`). No torch: buffers come from
sdrt.engine.buffers (anything with .ptr, .shape, .dtype).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sdrt import manifest as mf
from sdrt.contract import RUNTIME_MODELS, Dims, Model
from sdrt.engine import cuda
from sdrt.engine.engine_keys import check_engine, import_trt
from sdrt.errors import UserError


def _memory_size(engine) -> int:
    # Scratch (activation) bytes one context needs, max over profiles: device_memory_size_v2
    # since TRT 10.1 and in RTX (int64); TRT 10.0 has only device_memory_size.
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


def _set_memory(context, ptr: int, size: int) -> None:
    # Hand a USER_MANAGED context its scratch block (256-byte aligned, >= _memory_size):
    # set_device_memory(ptr, size) wraps setDeviceMemoryV2 (TRT >= 10.1, RTX); TRT 10.0 only has
    # the write-only `device_memory` property (setDeviceMemory, no size).
    if hasattr(context, "set_device_memory"):
        context.set_device_memory(ptr, size)
    else:
        context.device_memory = ptr


def check_profile(engine, model_name: str, name: str, shape: tuple) -> None:
    """UserError unless `shape` lies within profile 0 of input `name` (min <= shape <= max)."""
    prof = engine.get_tensor_profile_shape(name, 0)  # [min, opt, max] Dims of profile 0
    lo, opt, hi = (tuple(d) for d in prof) if prof else (tuple(engine.get_tensor_shape(name)),) * 3
    if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
        raise UserError(f"{model_name}: {name} shape {tuple(shape)} is outside the engine's profile "
                        f"(min {lo}, opt {opt}, max {hi}): rebuild with `sdrt build` for this size, "
                        f"or a --dynamic range that covers it")


class TensorRT:
    """The backend: loaded engines per model, one shared activation block, our own step graphs."""
    device = "cuda"
    max_plans = None

    def __init__(self, name: str, stream):
        self.name, self.trt = import_trt(name)        # self.trt: the tensorrt / tensorrt_rtx module
        self.stream = stream                          # cuda.Stream: every enqueue goes here
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))  # stderr logger
        self.engines: dict[str, TrtEngine] = {}
        self.activation_bytes = 0   # the shared activation block, once share_activation_memory ran

    def load(self, model: Model, plan_path: Path) -> "TrtEngine":
        data = Path(plan_path).read_bytes()
        if hasattr(self.runtime, "get_engine_validity"):  # RTX >= 1.1: header-only check
            validity, diag = self.runtime.get_engine_validity(data)  # (EngineValidity, bitmask)
            if validity == self.trt.EngineValidity.INVALID:
                why = [k for k, v in self.trt.EngineInvalidityDiagnostics.__members__.items()
                       if int(diag) & int(v)]
                fix = ("rebuild it with `sdrt build`" if why and
                       set(why) <= {"VERSION_MISMATCH", "MALFORMED_ENGINE"} else "see the log above")
                raise UserError(f"engine {plan_path} cannot run here "
                                f"({', '.join(why) or 'no usable GPU or driver?'}): {fix}")
        engine = self.runtime.deserialize_cuda_engine(data)  # ICudaEngine, None on failure
        if engine is None:
            raise UserError(f"cannot load engine {plan_path} (see the {self.name} log above: "
                            f"other version or GPU?): rebuild it with `sdrt build`")
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}  # I/O by name
        if names != {t.name for t in model.tensors}:
            raise UserError(f"engine {plan_path} has tensors {sorted(names)}, the contract of "
                            f"{model.name} {sorted(t.name for t in model.tensors)}: rebuild it")
        return TrtEngine(self.trt, model, engine, self.stream)

    def share_activation_memory(self, engines: list, alloc) -> None:
        """One scratch block, sized for the hungriest engine, for every context (they run one
        after another on one stream). Call after load() and before any bind()."""
        if any(e.contexts for e in engines):
            raise RuntimeError("share_activation_memory() must come before bind()")
        size = max((_memory_size(e.engine) for e in engines), default=0)
        self.activation_bytes = size
        block = (int(alloc(size)) if size else 0, size)
        for e in engines:
            e.activation = block

    # ---- the backend interface (sdrt.engine.pipeline) --------------------------------------------

    def runner(self, model: Model, dims: Dims) -> "TrtEngine":
        if model.name not in self.engines:
            flag = "".join(" " + f for f in model.step.build_flags) if model.step else ""
            raise UserError(f"no {self.name} engine for {model.name}: run `sdrt build ... --backend "
                            f"{self.name}{flag}` (guidance > 1 needs a *_cfg step, <= 1 the other; "
                            f"inpainting with a 4-channel UNet needs --inpaint)")
        return self.engines[model.name]

    def launcher(self, context: "TrtContext") -> cuda.Launch:
        if not context.capturable():
            return cuda.Launch(context.run, "none", f"{self.name} reports this enqueue is not "
                               "stream-capturable (is_stream_capturable() is False)")
        return cuda.capture_or_run(self.stream, context.run, warmups=1)  # TRT: one enqueue first

    def drop_plans(self) -> None:
        pass  # engines serve every shape plan within their profile

    refits = True             # LoRA: weights change in place (a refit), not new sessions

    def set_weights(self, weights: dict) -> None:
        """LoRA: refit exactly these initializers ({model: {ONNX initializer: array}}; TensorRT
        names a parsed initializer's weights after it) in each engine; the pipeline then makes new
        contexts and recaptures its CUDA graphs."""
        todo = {name: w for name, w in weights.items() if name in self.engines and w}
        for name in todo:  # all or none: refuse before the first engine changes
            self.engines[name].check_refittable()
        for name, w in todo.items():
            self.engines[name].refit(w)
        for e in self.engines.values():
            e.contexts.clear()   # the pipeline drops its plans: new contexts and graphs


def open_tensorrt(name: str, work_dir: Path, manifest: dict) -> TensorRT:
    """The backend with every engine `sdrt build` recorded for it, each checked for staleness."""
    backend = TensorRT(name, cuda.Stream())
    built = manifest.get("engines", {}).get(backend.name, {})
    if not built:
        raise UserError(f"no {name} engines in {work_dir}: run `sdrt build {work_dir} --backend {name}`")
    models = mf.models(manifest)
    for m in RUNTIME_MODELS:
        if m in built:
            backend.engines[m] = backend.load(models[m], check_engine(work_dir, backend.name, m))
    # one activation block for all engines: they run one after another on one stream
    backend.share_activation_memory(list(backend.engines.values()), cuda.malloc)
    return backend


class TrtEngine:
    """One deserialized engine and the model contract it implements."""

    def __init__(self, trt, model: Model, engine, stream):
        self.trt, self.model, self.engine, self.stream = trt, model, engine, stream
        self.activation = None  # (ptr, size) from share_activation_memory, else TRT allocates
        self.contexts: list[TrtContext] = []

    def refit(self, weights: dict) -> None:
        """Replace the named weights ({ONNX initializer name: array in the initializer's layout and
        dtype}) in the engine, synchronously. Needs an engine built with `sdrt build --refit`."""
        trt = self.trt
        self.check_refittable()
        refitter = trt.Refitter(self.engine, trt.Logger(trt.Logger.WARNING))
        known = set(refitter.get_all_weights())          # names of the refittable weights
        unknown = sorted(set(weights) - known)
        if unknown:
            raise UserError(f"the {self.model.name} engine has no refittable weight {unknown[0]!r} "
                            f"({len(unknown)} of {len(weights)} missing): rebuild with `sdrt build ... --refit`")
        keep = []
        for name, a in weights.items():
            a = np.ascontiguousarray(a)
            keep.append(a)                               # TRT reads the host memory at refit time
            if not refitter.set_named_weights(name, trt.Weights(a)):
                raise RuntimeError(f"{self.model.name}: refitter refused weight {name} {a.dtype} {a.shape}")
        if not refitter.refit_cuda_engine():
            missing = refitter.get_missing_weights()
            raise RuntimeError(f"{self.model.name}: refit failed (missing weights: {list(missing)[:3]})")
        del keep

    def check_refittable(self) -> None:
        if not getattr(self.engine, "refittable", False):
            raise UserError(f"the {self.trt.__name__} engine of {self.model.name} is not refittable, so "
                            f"LoRA cannot change it: rebuild with `sdrt build ... --refit`")

    def bind(self, buffers: dict, shapes: dict) -> "TrtContext":
        """A new execution context with every I/O tensor's shape and address set, once."""
        trt, eng = self.trt, self.engine
        if self.activation:  # context without its own scratch memory: we hand it the shared block
            ctx = eng.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        else:  # STATIC (default): the context allocates its own scratch memory
            ctx = eng.create_execution_context()
        if ctx is None:
            raise UserError(f"{self.model.name}: cannot create an execution context (GPU memory?)")
        if self.activation:
            _set_memory(ctx, *self.activation)
        for t in self.model.inputs:
            shape = tuple(shapes.get(t.name, buffers[t.name].shape))
            check_profile(eng, self.model.name, t.name, shape)
            ctx.set_input_shape(t.name, shape)  # fixes this context's shapes; outputs follow
        for t in self.model.tensors:
            buf = buffers[t.name]
            want = tuple(ctx.get_tensor_shape(t.name))  # outputs resolved from the input shapes
            dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(t.name)))  # engine's I/O dtype
            if tuple(buf.shape) != want or np.dtype(buf.dtype) != dtype:
                raise UserError(f"{self.model.name}: buffer {t.name} is {tuple(buf.shape)} "
                                f"{np.dtype(buf.dtype)}, the engine needs {want} {dtype}")
            ctx.set_tensor_address(t.name, int(buf.ptr))  # device pointer, bound once
        context = TrtContext(self.model.name, ctx, self.stream.ptr, buffers)
        self.contexts.append(context)
        return context


class TrtContext:
    """One bound execution context: run() enqueues the whole engine."""

    def __init__(self, name: str, context, stream: int, buffers: dict):
        self.name, self.context, self.stream = name, context, stream  # stream: cudaStream_t as int
        self._keep = buffers  # the bound device memory lives as long as the context

    def capturable(self) -> bool:
        """Whether this enqueue may be captured in a CUDA graph (TRT >= 10 / RTX report it)."""
        check = getattr(self.context, "is_stream_capturable", None)
        return True if check is None else bool(check(self.stream))

    def run(self) -> None:
        # Enqueue the whole engine on the stream (no sync); graph-capturable after one warm run.
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError(f"{self.name}: execute_async_v3 failed (see the TensorRT log)")
