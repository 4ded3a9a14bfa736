"""`sdrt bench WORK_DIR [WORK_DIR ...] --reference MODEL_DIR`: sdrt against eager diffusers, one run.

Same weights (exports of MODEL_DIR), same latents, same prompt, same GPU, same process. Several
exports of one model (e.g. --attention op and decomposed, FP16 and FP32) are measured side by side
against the one reference: a before/after in one run. For
each configuration: warm-up, then `runs` timed generations; medians and p90 of end to end and per
stage (CUDA events on the working stream), images/s, peak memory, PSNR against the reference
image. Results: JSON records + markdown table + PNG plot under --out.

With --image (image to image) or --image --mask (inpainting) the size is the image's, the VAE
encoder stage is timed too, and the reference is diffusers' img2img / inpainting pipeline given the
same noise and the posterior mean. The step time should stay that of text to image: the extra
inputs are bound once per call.
"""
from __future__ import annotations

import platform
import sys
import time

import numpy as np

import sdrt
from sdrt import manifest as mf
from sdrt.engine import cuda
from sdrt.errors import UserError

PROMPT, NEGATIVE, GUIDANCE = "a photo of an astronaut riding a horse on mars", "blurry", 7.5


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 for s in sizes):
        raise UserError(f"--sizes {text!r}: give HxW[,HxW...], e.g. 512x512")
    return sizes


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--{what} {text!r}: give comma-separated integers") from None
    if any(v <= 0 for v in values):
        raise UserError(f"--{what} {text!r}: values must be positive")
    return values


def available_backends(manifest: dict) -> list[str]:
    from sdrt.engine.ort_session import cuda_ep_available
    names = []
    if cuda.available():
        names += [n for n in ("tensorrt", "tensorrt-rtx") if manifest.get("engines", {}).get(n)]
        if cuda_ep_available():
            names.append("onnxruntime-cuda")
    return names or ["onnxruntime-cpu"]


def device_name() -> str:
    if cuda.available():
        return cuda.device_name()
    return f"cpu ({platform.machine()}, {__import__('os').cpu_count()} cores)"


def stats(values: list[float]) -> tuple[float, float]:
    return float(np.median(values)), float(np.percentile(values, 90))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def peak_mem_mb(baseline: int) -> float | None:
    if cuda.available():
        return (cuda.mem_used_bytes() - baseline) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def latents_for(cfg, batch, h, w) -> np.ndarray:
    shape = (batch, cfg.latent_channels, h // cfg.vae_factor, w // cfg.vae_factor)
    return np.random.default_rng(1234).standard_normal(shape, dtype=np.float32)


def bench_reference(ref, cfg, configs, steps: int, runs: int, warmup: int, inputs: dict) -> dict:
    out = {}
    for i, (h, w, batch) in enumerate(configs, 1):
        lat = latents_for(cfg, batch, h, w)
        say(f"[reference {i}/{len(configs)}] diffusers eager {h}x{w} batch {batch}: warm-up ...")
        for _ in range(warmup):
            ref.run(PROMPT, NEGATIVE, steps, GUIDANCE, h, w, lat, **inputs)
        timed = []
        for r in range(runs):
            say(f"[reference {i}/{len(configs)}] {h}x{w} batch {batch}: run {r + 1}/{runs}")
            image, t = ref.run(PROMPT, NEGATIVE, steps, GUIDANCE, h, w, lat, **inputs)
            timed.append(t)
        out[(h, w, batch)] = {"image": image, "e2e_ms": stats([t["e2e_ms"] for t in timed]),
                              "what": ref.description,
                              "unet_step_ms": float(np.median([t["unet_step_ms"] for t in timed])),
                              "peak_mem_mb": timed[-1]["peak_mem_mb"]}
    return out


def variants(names: list[str], manifest: dict) -> list[tuple[str, bool]]:
    """(backend, ort_fusion) pairs: ONNX Runtime backends run with and without onnx/ort/ when it
    was exported, so the attention fusion is measured before/after in the same run."""
    fused = bool(manifest.get("variants", {}).get("ort"))
    return [(n, f) for n in names for f in ((False, True) if fused and n.startswith("onnxruntime") else (True,))]


def bench_backend(name, ort_fusion, work_dir, cfg, configs, refs, steps: int, runs: int, warmup: int,
                  versions, inputs: dict) -> list[dict]:
    from sdrt.engine.pipeline import Pipeline
    baseline = cuda.mem_used_bytes() if cuda.available() else 0
    t = time.perf_counter()
    pipe = Pipeline(work_dir, backend=name, ort_fusion=ort_fusion)
    name = pipe.backend_name
    load_s = time.perf_counter() - t
    records = []
    for i, (h, w, batch) in enumerate(configs, 1):
        lat = latents_for(cfg, batch, h, w)
        say(f"[{name} {i}/{len(configs)}] {h}x{w} batch {batch}: warm-up (plan, graphs) ...")
        for _ in range(warmup):
            pipe.generate(PROMPT, NEGATIVE, steps, GUIDANCE, h, w, batch, latents=lat, **inputs)
        results = []
        for r in range(runs):
            say(f"[{name} {i}/{len(configs)}] {h}x{w} batch {batch}: run {r + 1}/{runs}")
            results.append(pipe.generate(PROMPT, NEGATIVE, steps, GUIDANCE, h, w, batch, latents=lat, **inputs))
        e2e, e2e_p90 = stats([r.timings["total_ms"] for r in results])
        step, step_p90 = stats([s for r in results for s in r.timings["steps_ms"]])
        ref = refs.get((h, w, batch))
        records.append({
            "device": device_name(), "backend": name, "precision": mf.precision_label(pipe.manifest),
            "attention": pipe.manifest.get("attention", "decomposed"), "export": work_dir.name,
            "height": h, "width": w, "steps": steps, "batch": batch, "runs": runs,
            "e2e_ms": e2e, "e2e_p90_ms": e2e_p90, "unet_step_ms": step, "unet_step_p90_ms": step_p90,
            "text_encoder_ms": float(np.median([r.timings["text_encoder_ms"] for r in results])),
            "vae_ms": float(np.median([r.timings["vae_ms"] for r in results])),
            "mode": mode_of(inputs), "strength": inputs.get("strength"),
            "vae_encoder_ms": (float(np.median([r.timings["vae_encoder_ms"] for r in results]))
                               if inputs.get("image") is not None else None),
            "steps_run": len(results[-1].timings["steps_ms"]),
            "tokenize_ms": float(np.median([r.timings["tokenize_ms"] for r in results])),
            "images_per_s": batch / (e2e / 1e3),
            "peak_mem_mb": peak_mem_mb(baseline), "load_s": load_s,
            "activation_mb": (pipe.backend.activation_bytes / 2 ** 20
                              if pipe.backend.activation_bytes is not None else None),
            "engine_build_s": _build_seconds(pipe.manifest, name),
            "reference_e2e_ms": ref["e2e_ms"][0] if ref else None,
            "reference_e2e_p90_ms": ref["e2e_ms"][1] if ref else None,
            "reference_unet_step_ms": ref["unet_step_ms"] if ref else None,
            "reference_peak_mem_mb": ref["peak_mem_mb"] if ref else None,
            "reference": ref["what"] if ref else None,
            "speedup_e2e": ref["e2e_ms"][0] / e2e if ref else None,
            "psnr_vs_reference": psnr(results[-1].images, ref["image"]) if ref else None,
            "graph": results[-1].timings["graph"],              # sdrt | onnxruntime | none
            "graph_error": results[-1].timings["graph_error"] or None,   # why not sdrt's own graph
            "versions": versions})
    return records


def _build_seconds(manifest: dict, backend: str) -> float | None:
    built = manifest.get("engines", {}).get(backend)
    return sum(e.get("build_s", 0) for e in built.values()) if built else None


def versions() -> dict:
    out = {"sdrt": sdrt.__version__, "python": platform.python_version()}
    for mod in ("numpy", "onnxruntime", "tensorrt", "tensorrt_rtx", "torch", "diffusers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed (or broken): absent from the record
            pass
    return out


def mode_of(inputs: dict) -> str:
    if inputs.get("mask") is not None:
        return "inpaint"
    return "img2img" if inputs.get("image") is not None else "txt2img"


def image_inputs(image, mask, strength, steps: int, cfg) -> tuple[dict, tuple[int, int] | None]:
    """({image, mask, strength} for generate and the reference, the image's (height, width))."""
    if image is None:
        if mask is not None or strength is not None:
            raise UserError("--mask and --strength need --image")
        return {}, None
    from sdrt.engine import image_input
    from sdrt.engine.scheduler import start_index
    image = image_input.load(image, "image").convert("RGB")
    mask = image_input.load(mask, "mask") if mask is not None else None
    src = image_input.prepare(image, mask, cfg.vae_factor)        # size and mask checks, one line each
    if strength is not None:
        start_index(steps, strength)
    return {"image": image, "mask": mask, "strength": strength}, (src.height, src.width)


def load_exports(work_dirs: list) -> list[dict]:
    """The manifests of the exports to compare: all of one model, or the comparison is void."""
    manifests = [mf.load(w) for w in work_dirs]
    for w, m in zip(work_dirs[1:], manifests[1:]):
        if m.get("source", {}).get("sha256") != manifests[0].get("source", {}).get("sha256"):
            raise UserError(f"{w} is an export of another model than {work_dirs[0]}: "
                            f"compare exports of one MODEL_DIR")
    return manifests


def demo_defaults(work_dirs: list, reference, no_reference: bool) -> tuple[list, object]:
    """No WORK_DIR: the demo model's export (made under ./sdrt-demo on first use), against the demo
    model's diffusers folder unless --reference says otherwise."""
    if work_dirs:
        if reference is None and not no_reference:
            raise UserError("--reference is required with a WORK_DIR (the diffusers pipeline folder it was "
                            "exported from), or pass --no-reference")
        return work_dirs, reference
    from sdrt.demo import DEMO_MODEL, demo_export
    return [demo_export()], DEMO_MODEL if reference is None else reference


def bench(work_dirs: list | None = None, reference=None, backends: str = "available", sizes: str | None = None,
          steps: int = 50, batches: str = "1,4,8", runs: int = 5, warmup: int = 1,
          out="benchmarks/results", no_reference: bool = False, image=None, mask=None,
          strength: float | None = None) -> list:
    """Measure, print the table, write the results under `out`; returns the files written.
    sizes None: the model's own size (512x512 for SD 1.5), or the image's size with `image`
    (image to image; with `mask`, inpainting)."""
    from sdrt.benchmarks import report
    work_dirs, reference = demo_defaults(work_dirs, reference, no_reference)
    manifests = load_exports(work_dirs)
    cfg = mf.config(manifests[0])
    size_list = parse_sizes(sizes or f"{cfg.default_height}x{cfg.default_width}")
    batch_list = parse_ints(batches, "batches")
    if steps <= 0 or runs <= 0 or warmup < 0:
        raise UserError("--steps and --runs must be positive, --warmup not negative")
    inputs, image_size = image_inputs(image, mask, strength, steps, cfg)
    if image_size is not None:
        if sizes is not None and size_list != [image_size]:
            raise UserError(f"--sizes {sizes}: with --image the size is the image's "
                            f"({image_size[0]}x{image_size[1]}); leave --sizes out")
        size_list = [image_size]
    configs = [(h, w, b) for h, w in size_list for b in batch_list]
    refs = {}
    if not no_reference:
        from sdrt.benchmarks.reference import Reference
        from sdrt.export.pipeline_folder import read_model_index
        read_model_index(reference)
        ref = Reference(reference)
        refs = bench_reference(ref, cfg, configs, steps, runs, warmup, inputs)
        ref.close()
    v = versions()
    records = []
    for work_dir, manifest in zip(work_dirs, manifests):
        names = available_backends(manifest) if backends == "available" else backends.split(",")
        records += [r for name, fused in variants(names, manifest)
                    for r in bench_backend(name, fused, work_dir, cfg, configs, refs, steps, runs, warmup, v, inputs)]
    paths = report.write(records, out)
    print(report.table(records))
    for p in paths:
        print(f"wrote {p}")
    return paths
