"""Engine keys: what a built TensorRT / TensorRT-RTX plan depends on, and the staleness check.

An engine built by `sdrt build` is recorded in manifest["engines"][backend][model] with the key it
was built for: ONNX hash, backend, TensorRT version, GPU, profile and options. `check_engine`
refuses a plan whose key no longer holds and says which field changed. The builder
(sdrt.export.build) and the runtime (sdrt.engine.tensorrt) both use this module, so they agree; it
lives with the runtime it serves, and the builder imports it from there.

No torch, no onnx, nothing from sdrt.export; TensorRT is imported only when asked for.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from sdrt import manifest as mf
from sdrt.engine import cuda
from sdrt.errors import UserError

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}  # backend name -> module
KEY_FIELDS = ("onnx_sha256", "io", "backend", "trt_version", "gpu_name", "compute_capability",
              "profile", "options")
ENV_FIELDS = KEY_FIELDS[:6]  # what check_engine compares besides the profile


def import_trt(name: str):
    """(backend, module) for a backend name ("tensorrt-rtx") or module name ("tensorrt_rtx")."""
    backend = {m: b for b, m in MODULES.items()}.get(name, name)
    if backend not in MODULES:
        raise UserError(f"unknown backend {name!r}: use one of {', '.join(MODULES)}")
    try:
        return backend, importlib.import_module(MODULES[backend])
    except ImportError as e:
        raise UserError(f"the {backend} backend needs the {MODULES[backend]} module ({e}): "
                        f"pip install 'sdrt[{backend}]'") from None


def major_minor(version: str) -> tuple[int, ...]:
    """"10.14.1.48" -> (10, 14); "1.25.0" -> (1, 25)."""
    return tuple(int(x) for x in version.split(".")[:2] if x.isdigit())


def target(backend: str) -> tuple[str, str]:
    """(gpu_name, compute_capability) an engine of `backend` is built for, here and now.

    RTX builds ahead of time on the CPU for portable targets (the plan is JIT-specialized on the
    user's GPU at load); TensorRT engines are tied to the GPU they were built on."""
    if backend == "tensorrt-rtx":
        return "any (portable RTX engine)", "rtx-default"
    if not cuda.available():
        return "none", "none"
    try:
        return cuda.device_name(), cuda.compute_capability()
    except Exception:  # a device counted but not queryable: treat as none
        return "none", "none"


# ---- ONNX identity (hash reused while no file's size or mtime changed) ---------------------------

def onnx_stat(files: list[Path]) -> dict:
    """{file name: [size, mtime_ns]}: recorded beside the hash so an unchanged export is not re-read."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def current_hash(work_dir: Path, manifest: dict, model_name: str, entry: dict | None
                 ) -> tuple[str, list[Path]]:
    """The ONNX hash now and the files it covers; reuses the engine entry's recorded hash when no
    file's size or mtime changed."""
    files = mf.model_files(work_dir, manifest, model_name)
    if entry and entry.get("onnx_stat") == onnx_stat(files) and entry.get("key", {}).get("onnx_sha256"):
        return entry["key"]["onnx_sha256"], files
    return mf.files_sha256(files), files


# ---- engine keys ----------------------------------------------------------------------------------

def io_digest(model) -> str:
    """The model's I/O contract (names, dtypes, shapes; e.g. a 9-channel inpainting UNet's step
    inputs) in short: engines keyed before it was part of the key are stale."""
    return mf.sha256_bytes(json.dumps(model.io_json(), sort_keys=True).encode())[:16]


def engine_key(backend: str, trt, onnx_hash: str, profile: dict | None, options: dict | None,
               io: str | None = None) -> dict:
    """What an engine depends on. Compared field by field; any change means rebuild."""
    gpu, cc = target(backend)
    return {"onnx_sha256": onnx_hash, "io": io, "backend": backend, "trt_version": trt.__version__,
            "gpu_name": gpu, "compute_capability": cc, "profile": profile, "options": options}


def first_change(old: dict, new: dict, fields=KEY_FIELDS) -> str | None:
    """The first of `fields` that differs between two keys, said for a person; None if none."""
    for f in fields:
        if old.get(f) != new.get(f):
            if f == "onnx_sha256":
                return f"onnx_sha256 changed (built from {str(old.get(f))[:12]}…, export has " \
                       f"{str(new.get(f))[:12]}…)"
            if f == "io":
                return ("io changed (built before its inputs/outputs were part of the engine key, or for "
                        "another contract, e.g. before 9-channel inpainting UNets)")
            if isinstance(new.get(f), dict):
                return f"{f} changed"
            return f"{f} changed (built for {old.get(f)}, now {new.get(f)})"
    return None


def _profile_problem(built: dict, expected: dict) -> str | None:
    """Exact profiles ({name: {min, opt, max}}) must be equal; plain shapes ({name: shape}) must fit."""
    for name, want in expected.items():
        have = built.get(name)
        if have is None:
            return f"profile changed (the engine has no input {name})"
        if isinstance(want, dict):
            if {k: list(v) for k, v in want.items()} != have:
                return f"profile changed for {name} (built {_fmt(have)}, wanted {_fmt(want)})"
        elif len(want) != len(have["min"]) or not all(
                a <= s <= b for a, s, b in zip(have["min"], want, have["max"])):
            return f"profile does not cover {name} {list(want)} (built {_fmt(have)})"
    return None


def _fmt(p: dict) -> str:
    return " ".join(f"{k} {'x'.join(map(str, p[k]))}" for k in ("min", "opt", "max"))


def check_engine(work_dir: Path, backend: str, model_name: str, expected_profile: dict | None = None
                 ) -> Path:
    """The plan of `model_name`, or UserError saying which part of its key no longer holds.

    expected_profile: {input: {"min","opt","max"}} compared exactly, or {input: shape} that must
    lie within the built profile; None skips the profile check."""
    work_dir = Path(work_dir)
    backend, trt = import_trt(backend)
    man = mf.load(work_dir)
    rebuild = f"run `sdrt build {work_dir} --backend {backend}`"
    entry = man.get("engines", {}).get(backend, {}).get(model_name)
    if entry is None:
        raise UserError(f"no {backend} engine for {model_name} in {work_dir}: {rebuild}")
    if model_name not in man["models"]:
        raise UserError(f"{work_dir} has no {model_name} model: export again, then {rebuild}")
    plan = work_dir / entry["file"]
    if not plan.is_file() or plan.stat().st_size != entry.get("size_bytes"):
        raise UserError(f"engine {model_name} is missing or damaged ({plan}): {rebuild}")
    onnx_hash, _ = current_hash(work_dir, man, model_name, entry)
    now = engine_key(backend, trt, onnx_hash, None, None, io=io_digest(mf.models(man)[model_name]))
    built = entry.get("key") or {}
    why = first_change(built, now, ENV_FIELDS)
    if why is None and expected_profile is not None:
        why = _profile_problem(built.get("profile") or {}, expected_profile)
    if why:
        raise UserError(f"engine {model_name} is stale: {why}; {rebuild}")
    return plan
