"""Pick and open a backend. Each adapter (ort_backend, trt_backend) only loads models and binds
buffers; the stream, the buffers, CUDA graphs and the loop are shared and live here and in
pipeline.py.

    backend.runner(model, dims) -> loaded model with .bind(buffers, shapes) -> binding.run()
    backend.launcher(binding)   -> a function that runs one step (a CUDA graph launch on GPU)
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from sdrt import manifest as mf
from sdrt.contract import RUNTIME_MODELS, Dims, Model
from sdrt.engine import cuda
from sdrt.errors import UserError

NAMES = ("tensorrt", "tensorrt-rtx", "onnxruntime-cuda", "onnxruntime-cpu")


def open_backend(name: str, work_dir: Path, manifest: dict, ort_fusion: bool = True):
    """ort_fusion: ONNX Runtime backends run onnx/ort/ (ORT's attention fusion) when exported."""
    variant = "ort" if ort_fusion and manifest.get("variants", {}).get("ort") else None
    if name == "auto":
        name = pick_auto(manifest)
    if name not in NAMES:
        raise UserError(f"unknown backend {name!r}: choose auto or one of {', '.join(NAMES)}")
    if name == "onnxruntime-cpu":
        return OrtCpu(work_dir, manifest, variant)
    if not cuda.available():
        extra = "onnxruntime-gpu" if name == "onnxruntime-cuda" else name
        raise UserError(f"backend {name} needs an NVIDIA GPU with cuda-python installed "
                        f"(pip install 'sdrt[{extra}]'); none was found ({cuda.why_unavailable() or 'no device'}): "
                        "use --backend onnxruntime-cpu")
    if name == "onnxruntime-cuda":
        return OrtCuda(work_dir, manifest, variant)
    return Trt(name, work_dir, manifest)


def pick_auto(manifest: dict) -> str:
    """TensorRT engines if built and runnable, else ONNX Runtime CUDA, else ONNX Runtime CPU."""
    from sdrt.engine.ort_backend import cuda_ep_available
    if cuda.available():
        for name in ("tensorrt", "tensorrt-rtx"):
            if manifest.get("engines", {}).get(name) and _importable(name.replace("-", "_")):
                return name
        if cuda_ep_available():
            return "onnxruntime-cuda"
    return "onnxruntime-cpu"


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


class OrtCpu:
    device, stream = "cpu", None
    max_plans = None
    activation_bytes = None   # ONNX Runtime plans its arenas itself: no figure before running

    refits = False            # LoRA: new sessions with overriding initializers (set_weights)

    def __init__(self, work_dir: Path, manifest: dict, variant: str | None, stream=None):
        from sdrt.engine.ort_backend import OrtBackend
        self.stream = stream
        self.ort = OrtBackend("cuda" if stream else "cpu", stream)
        self.work_dir, self.manifest, self.variant, self.cache = work_dir, manifest, variant, {}
        self.name = self.ort.name + ("+ort-fusion" if variant else "")
        self.weights: dict = {}   # {model name: {initializer: array}} replacing the export's

    def path(self, model: Model) -> Path:
        return mf.onnx_path(self.work_dir, model, self.manifest, self.variant)

    def runner(self, model: Model, dims: Dims):
        if model.name not in self.cache:  # dynamic shapes: one session serves every plan
            self.cache[model.name] = self.ort.load(model, self.path(model), dims, self.weights.get(model.name))
        return self.cache[model.name]

    def set_weights(self, weights: dict) -> None:
        """LoRA: sessions of the models whose weights change are made anew by the next runner()
        call, from the export with these initializers overriding its own."""
        if self.variant and any(weights.values()):  # the fused graphs have other initializers
            warnings.warn("LoRA runs the plain graphs (onnx/), not ONNX Runtime's fused variant (onnx/ort/)")
            self.variant, self.name, self.weights = None, self.ort.name, {}
            self.cache.clear()
        for name in set(weights) | set(self.weights):
            if _differ(weights.get(name, {}), self.weights.get(name, {})):
                for key in [k for k in self.cache if (k[0] if isinstance(k, tuple) else k) == name]:
                    del self.cache[key]
        self.weights = {n: w for n, w in weights.items() if w}

    def launcher(self, binding):
        return binding.run

    def drop_plans(self) -> None:
        self.cache.clear()


def _differ(a: dict, b: dict) -> bool:
    return a.keys() != b.keys() or any(x is not b[k] and not np.array_equal(x, b[k]) for k, x in a.items())


ORT_CUDA_ATTENTION = (1, 25)   # first onnxruntime-gpu with a CUDA kernel for ONNX's Attention op


def warn_if_attention_on_cpu(ort_version: str, attention_form: str | None) -> None:
    """Older ORT places the Attention op on the CPU: it still runs, slowly and without a graph."""
    from sdrt.engine.engine_cache import major_minor
    if attention_form == "op" and major_minor(ort_version) < ORT_CUDA_ATTENTION:
        warnings.warn(f"onnxruntime {ort_version} has no CUDA kernel for ONNX's Attention op (it runs on the "
                      f"CPU, and the step cannot be captured): install onnxruntime-gpu>=1.25 or export with "
                      f"--attention decomposed")


class OrtCuda(OrtCpu):
    """Sessions per shape plan (static shapes: every node on the CUDA EP, no Memcpy). Each plan
    holds its own copy of the weights, so only the latest plan is kept."""
    device = "cuda"
    max_plans = 1

    def __init__(self, work_dir: Path, manifest: dict, variant: str | None):
        super().__init__(work_dir, manifest, variant, cuda.Stream())
        warn_if_attention_on_cpu(self.ort.ort.__version__, manifest.get("attention"))

    def runner(self, model: Model, dims: Dims):
        key = (model.name, dims)
        if key not in self.cache:
            self.cache[key] = self.ort.load(model, self.path(model), dims)
        return self.cache[key]

    def launcher(self, binding):
        # warm-ups grow ORT's arena and run cuDNN's algorithm search outside the capture
        return cuda.capture_or_run(self.stream, binding.run, warmups=3)


class Trt:
    """TensorRT or TensorRT-RTX engines; we capture the step graphs ourselves."""
    device = "cuda"
    max_plans = None

    def __init__(self, name: str, work_dir: Path, manifest: dict):
        from sdrt.engine.engine_cache import check_engine
        from sdrt.engine.trt_backend import TrtBackend
        self.stream = cuda.Stream()
        self.trt = TrtBackend(name, self.stream.ptr)
        self.name = self.trt.name
        built = manifest.get("engines", {}).get(name, {})
        if not built:
            raise UserError(f"no {name} engines in {work_dir}: run `sdrt build {work_dir} --backend {name}`")
        models = mf.models(manifest)
        self.models = {}
        for m in RUNTIME_MODELS:
            if m in built:
                plan = check_engine(work_dir, name, m)
                self.models[m] = self.trt.load(models[m], plan)
        # one activation block for all engines: they run one after another on one stream
        self.trt.share_activation_memory(list(self.models.values()), cuda.malloc)

    @property
    def activation_bytes(self) -> int:
        """TensorRT's own figure for the shared activation block (for `sdrt bench`)."""
        return self.trt.activation_bytes

    def runner(self, model: Model, dims: Dims):
        if model.name not in self.models:
            flag = " --no-guidance" if model.name == "denoise_step" else ""
            raise UserError(f"no {self.name} engine for {model.name}: run `sdrt build ... --backend "
                            f"{self.name}{flag}` (guidance > 1 needs denoise_step_cfg, <= 1 denoise_step)")
        return self.models[model.name]

    def launcher(self, binding):
        if not binding.capturable():
            return binding.run
        return cuda.capture_or_run(self.stream, binding.run, warmups=1)  # TRT: one enqueue first

    refits = True             # LoRA: weights change in place (TensorRT refit)

    def set_weights(self, weights: dict) -> None:
        """LoRA: refit exactly these initializers (engine weight names are the ONNX initializer
        names) in each engine; the pipeline then rebinds and recaptures its CUDA graphs."""
        todo = {name: w for name, w in weights.items() if name in self.models and w}
        for name in todo:  # all or none: refuse before the first engine changes
            self.models[name].check_refittable()
        for name, w in todo.items():
            self.models[name].refit(w)
        for m in self.models.values():
            m.bindings.clear()   # the pipeline drops its plans: new contexts and graphs

    def drop_plans(self) -> None:
        pass
