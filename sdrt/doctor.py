"""`sdrt doctor [WORK_DIR] [--json FILE]`: what is installed, what runs here and why not, and one
live generation per usable backend compared with ONNX Runtime on the CPU.

    environment()            Python, numpy, cuda-python, driver / runtime CUDA versions, GPUs
    backend_status(name)     installed (and the pip extra), version, usable or why not
    work_dir_report(...)     precision per model, attention form vs TensorRT, engine keys (stale?)
    live_check(...)          one generation with fixed latents: PSNR vs the CPU reference, which
                             CUDA graph path the step took (and the capture error), ms, memory

Exit status 0 when every live-checked backend agrees with the CPU reference (PSNR >= 40 dB for an
FP16 export, >= 50 dB for FP32), 1 otherwise. No torch: only the default WORK_DIR (the demo
model's export, made when missing) needs the export extra; for it, doctor also builds the
TensorRT / TensorRT-RTX engines a usable TensorRT backend lacks (a given WORK_DIR is only read).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from sdrt import manifest as mf
from sdrt.errors import UserError
from sdrt.extras import ORT_GPU_FIX

BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "tensorrt-rtx")
MODULE = {"onnxruntime-cpu": "onnxruntime", "onnxruntime-cuda": "onnxruntime",
          "tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
EXTRA = {"onnxruntime-cpu": "onnxruntime", "onnxruntime-cuda": "onnxruntime-gpu",
         "tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt-rtx"}
MIN_PSNR = {"fp16": 40.0, "fp32": 50.0}
# CUDA major version of cuda-python -> the oldest driver that runs it (NVIDIA's CUDA release notes:
# 12.x needs >= 525 with minor-version compatibility, 13.x needs >= 580).
DRIVER_FOR_CUDA = {12: 525, 13: 580}
RTX_MIN_CC = (7, 5)               # TensorRT-RTX runs on Turing and newer GeForce/RTX parts,
RTX_NO_CC_MAJOR = (9, 10, 11)     # not on Hopper (9.x) nor data-center Blackwell (10.x, 11.x)
LIVE = {"prompt": "a red fox in the snow, watercolor", "negative": "blurry", "steps": 8,
        "guidance": 7.5, "batch": 1, "seed": 1234}
MB = 2 ** 20


# ---- environment -----------------------------------------------------------------------------------

def version_of(*dists: str) -> str | None:
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def import_or_none(module: str):
    try:
        return importlib.import_module(module)
    except Exception:  # not installed, or broken (a missing shared library raises OSError)
        return None


def cuda_version(v: int) -> str:
    """CUDA's integer versions: 12040 -> "12.4"."""
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none"


def cuda_environment() -> dict:
    """cuda-python's version, the driver's and runtime's CUDA versions, the GPUs, or the error."""
    out = {"cuda_python": version_of("cuda-python", "cuda-bindings"), "driver_cuda": None,
           "runtime_cuda": None, "gpus": [], "error": None}
    if out["cuda_python"] is None:
        out["error"] = "cuda-python is not installed"
        return out
    from sdrt.engine import cuda
    try:
        rt = cuda.rt()
    except ImportError as e:
        out["error"] = f"cuda-python does not import ({e})"
        return out
    err, drv = rt.cudaDriverGetVersion()
    out["driver_cuda"] = cuda_version(int(drv)) if int(err) == 0 else None
    err, run = rt.cudaRuntimeGetVersion()
    out["runtime_cuda"] = cuda_version(int(run)) if int(err) == 0 else None
    try:
        count = cuda.check(rt.cudaGetDeviceCount())
        for i in range(count):
            prop = cuda.check(rt.cudaGetDeviceProperties(i))
            name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
            out["gpus"].append({"index": i, "name": name.rstrip("\x00"),
                                "compute_capability": f"{prop.major}.{prop.minor}",
                                "memory_total_mb": round(int(prop.totalGlobalMem) / MB)})
        if count:
            out["gpus"][0]["memory_free_mb"] = round(cuda.mem_free_bytes() / MB)
    except Exception as e:  # no driver, driver too old, no device
        out["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
    return out


def environment() -> dict:
    return {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
            "numpy": np.__version__, "cuda": cuda_environment()}


def gpu_problem(cuda_env: dict) -> str | None:
    """Why no GPU backend can run here, said for a person; None when a GPU is usable."""
    if cuda_env["cuda_python"] is None:
        return "no cuda-python (it comes with the GPU extras, e.g. pip install 'sdrt[onnxruntime-gpu]')"
    if cuda_env["gpus"]:
        return None
    major = int(cuda_env["cuda_python"].split(".")[0])
    driver = cuda_env["driver_cuda"]
    if driver in (None, "none"):
        return f"no NVIDIA GPU / driver ({cuda_env['error'] or 'no device'})"
    need = DRIVER_FOR_CUDA.get(major)
    if need and int(driver.split(".")[0]) < major:
        return (f"cuda-python {major} needs driver >= {need} (this driver supports CUDA {driver}): "
                f"update the driver or pip install 'cuda-python<{major}'")
    return f"no usable NVIDIA GPU ({cuda_env['error'] or 'no device'})"


# ---- backends --------------------------------------------------------------------------------------

def backend_status(name: str, cuda_env: dict) -> dict:
    """{backend, module, extra, installed, version, usable, why}."""
    module = MODULE[name]
    out = {"backend": name, "module": module, "extra": f"sdrt[{EXTRA[name]}]", "installed": False,
           "version": None, "usable": False, "why": None}
    mod = import_or_none(module)
    if mod is None:
        out["why"] = f"{module} is not installed (pip install '{out['extra']}')"
        return out
    out["installed"], out["version"] = True, getattr(mod, "__version__", None)
    out["why"] = backend_problem(name, mod, cuda_env)
    out["usable"] = out["why"] is None
    return out


def backend_problem(name: str, mod, cuda_env: dict) -> str | None:
    if name == "onnxruntime-cpu":
        ok = "CPUExecutionProvider" in mod.get_available_providers()
        return None if ok else "this onnxruntime has no CPUExecutionProvider"
    if name == "onnxruntime-cuda" and "CUDAExecutionProvider" not in mod.get_available_providers():
        return f"onnxruntime without CUDA EP: {ORT_GPU_FIX}"
    if why := gpu_problem(cuda_env):
        return why
    cc = cuda_env["gpus"][0]["compute_capability"]
    major, minor = (int(x) for x in cc.split("."))
    if name == "tensorrt-rtx" and (major in RTX_NO_CC_MAJOR or (major, minor) < RTX_MIN_CC):
        return f"TensorRT-RTX engines do not run on compute capability {cc} ({cuda_env['gpus'][0]['name']})"
    return None


# ---- the export ------------------------------------------------------------------------------------

def model_precisions(manifest: dict) -> dict:
    """{model: fp16 | fp32}, as the manifest records them (sdrt.manifest.model_precision)."""
    return {m: mf.model_precision(manifest, m) for m in manifest["models"]}


def attention_check(manifest: dict, statuses: dict) -> list[str]:
    """Problems between the export's attention form and the installed runtimes."""
    from sdrt.engine.ort_cuda import ORT_CUDA_ATTENTION
    from sdrt.engine.engine_keys import major_minor
    form, out = manifest.get("attention", "decomposed"), []
    trt = statuses["tensorrt"]
    if trt["installed"] and form == "op":
        from sdrt.export.build import check_attention_support
        try:
            check_attention_support(import_or_none("tensorrt"), "tensorrt", form)
        except UserError as e:
            out.append(str(e))
    ort = statuses["onnxruntime-cuda"]
    if ort["usable"] and form == "op" and major_minor(ort["version"]) < ORT_CUDA_ATTENTION:
        out.append(f"onnxruntime {ort['version']} runs the Attention op on the CPU (no CUDA kernel "
                   f"before 1.25): the step cannot be captured; export with --attention decomposed")
    return out


def engine_checks(work_dir: Path, manifest: dict, statuses: dict) -> list[dict]:
    """Every engine the manifest records: ok, or stale and which key field, or not checkable here."""
    from sdrt.engine.engine_keys import check_engine
    out = []
    for backend, engines in manifest.get("engines", {}).items():
        for model in engines:
            row = {"backend": backend, "model": model, "state": "ok", "why": None}
            if backend not in statuses or not statuses[backend]["installed"]:
                row["state"], row["why"] = "unchecked", f"{backend} is not installed"
            else:
                try:
                    check_engine(work_dir, backend, model)
                except UserError as e:
                    row["state"], row["why"] = "stale", str(e)
            out.append(row)
    return out


def work_dir_report(work_dir: Path, manifest: dict, statuses: dict) -> dict:
    return {"path": str(work_dir), "precision": manifest["precision"],
            "attention": manifest.get("attention", "decomposed"),
            "controlnets": mf.config(manifest).controlnets,
            "models": model_precisions(manifest), "attention_problems": attention_check(manifest, statuses),
            "engines": engine_checks(work_dir, manifest, statuses)}


# ---- live check ------------------------------------------------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def fixed_latents(manifest: dict) -> np.ndarray:
    cfg = mf.config(manifest)
    shape = (LIVE["batch"], cfg.latent_channels, *cfg.sample_hw)   # the model's default size
    return np.random.default_rng(LIVE["seed"]).standard_normal(shape, dtype=np.float32)


def own_image_and_mask(cfg, height: int | None = None, width: int | None = None) -> dict:
    """An inpainting UNet needs an image and a mask for any generation, an upscaler a low-resolution
    image: doctor and bench-lora make their own (a smooth colour gradient; the right half
    repainted; an upscaler's at 1/vae_factor of the size, with fixed image noise) at the given
    output size (default: the model's). Returns generate's keywords, empty for other UNets."""
    if not (cfg.inpainting_unet or cfg.upscaler):
        return {}
    h, w = height or cfg.default_height, width or cfg.default_width
    if cfg.upscaler:
        h, w = h // cfg.vae_factor, w // cfg.vae_factor
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), np.full((h, w), 128.0)], -1).astype(np.uint8)
    if cfg.upscaler:
        noise = np.random.default_rng(LIVE["seed"] + 1).standard_normal((1, 3, h, w), dtype=np.float32)
        return {"image": image, "image_noise": noise}
    mask = np.where(x >= w // 2, 255, 0)
    return {"image": image, "mask": mask.astype(np.uint8)}


def fixed_controls(manifest: dict) -> list | None:
    """An export with ControlNets is checked running them: one fixed conditioning image each (a
    grid of lines at the model's default size), scale 1."""
    cfg = mf.config(manifest)
    if not cfg.controlnets:
        return None
    h, w = cfg.default_height, cfg.default_width
    grid = np.zeros((h, w, 3), np.uint8)
    grid[::max(h // 8, 1)] = 255
    grid[:, ::max(w // 8, 1)] = 255
    return [grid] * cfg.controlnets


def memory_mb(device: str, baseline: int) -> float:
    from sdrt.engine import cuda
    if device == "cuda":
        return (cuda.mem_used_bytes() - baseline) / MB
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # peak RSS of the process


def run_once(work_dir: Path, backend: str, latents: np.ndarray, ort_fusion: bool, control=None) -> dict:
    """One generation: image, timings and device memory (CPU: the process's peak RSS)."""
    from sdrt.engine import cuda
    from sdrt.engine.pipeline import Pipeline
    on_gpu = backend != "onnxruntime-cpu"
    baseline = cuda.mem_used_bytes() if on_gpu else 0
    pipe = Pipeline(work_dir, backend=backend, ort_fusion=ort_fusion)
    result = pipe.generate(LIVE["prompt"], LIVE["negative"], LIVE["steps"], LIVE["guidance"],
                           batch=LIVE["batch"], latents=latents, control=control, **own_image_and_mask(pipe.config))
    t = result.timings
    return {"image": result.images, "backend_name": pipe.backend_name, "graph": t["graph"],
            "graph_error": t["graph_error"] or None, "step_ms": t["unet_step_ms"],
            "total_ms": t["total_ms"], "memory_mb": round(memory_mb("cuda" if on_gpu else "cpu", baseline), 1)}


def build_missing_engines(work_dir: Path, manifest: dict, statuses: dict) -> dict:
    """TensorRT engines for every usable TensorRT backend that has none (the demo export only:
    a user's WORK_DIR is not written to). Returns the manifest as it is afterwards."""
    from sdrt.export.build import build
    for name in ("tensorrt", "tensorrt-rtx"):
        if statuses[name]["usable"] and not manifest.get("engines", {}).get(name):
            print(f"[doctor] sdrt build {work_dir} --backend {name}", file=sys.stderr, flush=True)
            try:
                control = bool(manifest.get("config", {}).get("controlnets"))   # their steps too
                build(work_dir, name, **({"control": True} if control else {}))
            except UserError as e:   # the live check then says "no engines" and the build's reason
                statuses[name]["build_error"] = str(e)
    return mf.load(work_dir)


def live_check(work_dir: Path, manifest: dict, statuses: dict) -> list[dict]:
    """The CPU reference first (ONNX Runtime, plain export), then every usable GPU backend."""
    latents, threshold = fixed_latents(manifest), MIN_PSNR[manifest["precision"]]
    rows, ref = [], None
    for name in BACKENDS:
        st = statuses[name]
        row = {"backend": name, "ran": False, "psnr_db": None, "min_psnr_db": threshold, "ok": None}
        if not st["usable"]:
            row["skipped"] = st["why"]
        elif name.startswith("tensorrt") and not manifest.get("engines", {}).get(name):
            row["skipped"] = st.get("build_error") or \
                f"no {name} engines in {work_dir}: run `sdrt build {work_dir} --backend {name}`"
        elif ref is None and name != "onnxruntime-cpu":
            row["skipped"] = "no CPU reference (onnxruntime-cpu did not run)"
        else:
            print(f"[doctor] live check: {name} ...", file=sys.stderr, flush=True)
            try:
                controls = fixed_controls(manifest)
                got = run_once(work_dir, name, latents, ort_fusion=name != "onnxruntime-cpu",
                               **({"control": controls} if controls else {}))
            except Exception as e:  # UserError or a runtime failure: the row says which
                row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            else:
                image = got.pop("image")
                row.update(got, ran=True)
                if name == "onnxruntime-cpu":
                    ref, row["ok"], row["psnr_db"] = image, True, "reference"
                else:
                    p = psnr(image, ref)
                    row.update(psnr_db=p, ok=p >= threshold)
        rows.append(row)
    return rows


# ---- report ----------------------------------------------------------------------------------------

def fmt_psnr(v) -> str:
    if v is None or isinstance(v, str):
        return v or "-"
    return "inf" if math.isinf(v) else f"{v:.1f} dB"


def table(report: dict) -> str:
    env, c = report["environment"], report["environment"]["cuda"]
    lines = ["environment",
             f"  python          {env['python']} ({env['platform']})",
             f"  numpy           {env['numpy']}",
             f"  cuda-python     {c['cuda_python'] or 'not installed'}"
             + (f" (driver CUDA {c['driver_cuda']}, runtime CUDA {c['runtime_cuda']})" if c["cuda_python"] else "")]
    for g in c["gpus"]:
        free = f", {g['memory_free_mb']} MiB free" if "memory_free_mb" in g else ""
        lines.append(f"  gpu {g['index']}           {g['name']}, compute capability {g['compute_capability']}, "
                     f"{g['memory_total_mb']} MiB{free}")
    if not c["gpus"]:
        lines.append(f"  gpu             none ({report['gpu_problem']})")
    lines += ["", "backends", f"  {'backend':<18}{'installed':<11}{'version':<14}{'usable':<8}why not"]
    for b in report["backends"]:
        lines.append(f"  {b['backend']:<18}{'yes' if b['installed'] else 'no':<11}{b['version'] or '-':<14}"
                     f"{'yes' if b['usable'] else 'no':<8}{b['why'] or ''}")
    w = report.get("work_dir")
    if w:
        lines += ["", f"work dir {w['path']} ({w['precision']}, attention {w['attention']})",
                  "  models: " + ", ".join(f"{m} {p}" for m, p in w["models"].items())]
        lines += [f"  attention: {p}" for p in w["attention_problems"]] or ["  attention: ok for what is installed"]
        if w.get("controlnets"):
            lines.append(f"  controlnets: {w['controlnets']} (the live check runs them, on a fixed grid image)")
        for e in w["engines"]:
            lines.append(f"  engine {e['backend']}/{e['model']}: {e['state']}" + (f" ({e['why']})" if e["why"] else ""))
        if not w["engines"]:
            lines.append("  engines: none built")
    if report.get("live"):
        lines += ["", f"live check ({LIVE['steps']} steps, guidance {LIVE['guidance']}, batch {LIVE['batch']}, "
                  "fixed latents; reference: onnxruntime-cpu)",
                  f"  {'backend':<18}{'psnr':<11}{'graph':<13}{'step ms':>9}{'total ms':>10}{'mem MiB':>9}  result"]
        for r in report["live"]:
            if not r["ran"]:
                lines.append(f"  {r['backend']:<18}{'-':<11}{'-':<13}{'-':>9}{'-':>10}{'-':>9}  "
                             + (f"FAILED: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"))
                continue
            verdict = "reference" if r["psnr_db"] == "reference" else (
                "ok" if r["ok"] else f"FAILED (needs >= {r['min_psnr_db']:.0f} dB)")
            lines.append(f"  {r['backend']:<18}{fmt_psnr(r['psnr_db']):<11}{r['graph']:<13}{r['step_ms']:>9.2f}"
                         f"{r['total_ms']:>10.1f}{r['memory_mb']:>9.1f}  {verdict}")
            if r["graph_error"]:
                lines.append(f"    graph: {r['graph_error']}")
    elif report.get("live_skipped"):
        lines += ["", f"live check skipped: {report['live_skipped']}"]
    lines += ["", f"result: {'ok' if report['ok'] else 'FAILED'} (exit {0 if report['ok'] else 1})"]
    return "\n".join(lines)


def resolve_work_dir(work_dir: Path | None) -> tuple[Path | None, str | None]:
    """(WORK_DIR, None), or (None, why) when the default demo export cannot be made here."""
    if work_dir is not None:
        return Path(work_dir), None
    from sdrt.demo import demo_export
    try:
        return demo_export(), None
    except ImportError as e:
        return None, f"no WORK_DIR given, and {e}; or give a WORK_DIR"


def json_safe(x):
    """inf PSNR (identical images) as the string "inf": JSON has no infinity."""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x


def doctor(work_dir: Path | None = None, json_out: Path | None = None) -> int:
    """Print the report (and write it as JSON); the exit status: 0 all agree, 1 otherwise."""
    from sdrt.fileio import write_json_atomic
    if work_dir is not None:
        mf.load(work_dir)                  # a wrong WORK_DIR: one line, exit 2, before any work
    t0 = time.perf_counter()
    env = environment()
    statuses = {name: backend_status(name, env["cuda"]) for name in BACKENDS}
    report = {"environment": env, "gpu_problem": gpu_problem(env["cuda"]), "backends": list(statuses.values())}
    path, why = resolve_work_dir(work_dir)
    if path is None:
        report["live_skipped"], report["live"] = why, []
    else:
        manifest = mf.load(path)
        if work_dir is None:               # the demo export: build what the live check needs
            manifest = build_missing_engines(path, manifest, statuses)
        report["work_dir"] = work_dir_report(path, manifest, statuses)
        report["live"] = live_check(path, manifest, statuses)
    ran = [r for r in report["live"] if "skipped" not in r]
    report["ok"] = bool(ran) and all(r["ok"] for r in ran)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    print(table(report))
    if json_out is not None:
        write_json_atomic(Path(json_out), json_safe(report))
        print(f"wrote {json_out}")
    return 0 if report["ok"] else 1
