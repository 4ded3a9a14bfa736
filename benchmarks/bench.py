"""`sdrt bench WORK_DIR [WORK_DIR ...] --reference MODEL_DIR`: sdrt against eager diffusers, one run.

Same weights (exports of MODEL_DIR), same latents, same prompt and guidance (a prompt the model's
tokenizer takes whole: a caption of the demo's world for the demo model), same device, same process.
Several exports of one model (e.g. --attention op and decomposed, FP16 and FP32) are measured side
by side against the one reference: a before/after in one run.

The contenders (each export x backend, and the reference) are loaded once; per configuration
(size, batch) each is warmed up, then the timed runs go round the contenders in turn, A B C A B C
... (interleaved, the default with more than one contender), so that a shared machine's drift
(other jobs, clocks, heat) falls on all of them alike; --no-interleave runs all of A, then all of
B. Per stage (tokenize, text encoder, denoise, VAE encoder, VAE decoder, total): min / median /
max over the runs (CUDA events on the working stream on a GPU, host clocks on CPU); images/s,
peak memory, PSNR of the last images against the reference's. Results: JSON + markdown table +
PNG (sdrt.benchmarks.report) under --out.

With --image (image to image) or --image --mask (inpainting) the size is the image's, the VAE
encoder stage is timed too, and the reference is diffusers' img2img / inpainting pipeline given the
same noise and the posterior mean.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import sdrt
from sdrt import manifest as mf
from sdrt.engine import cuda
from sdrt.errors import UserError

PROMPT, NEGATIVE, GUIDANCE = "a photo of an astronaut riding a horse on mars", "blurry", 7.5
DEFAULT_OUT = Path("sdrt-results")          # under the current directory
# per-stage timings of one generation, in the order the plot stacks them (total: end to end)
STAGES = ("tokenize", "text_encoder", "vae_encoder", "denoise", "vae_decoder", "total")


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


def parse_backends(text: str, manifest: dict) -> list[str]:
    """--backends: 'available' (what runs here) or a comma list of backend names; checked before
    anything loads, with advice in this command's own flags."""
    from sdrt.engine.backends import NAMES
    if text == "available":
        return available_backends(manifest)
    names = [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        raise UserError(f"--backends {text!r}: give 'available' or a comma list of {', '.join(NAMES)}")
    gpu_only = [n for n in names if n != "onnxruntime-cpu"]
    if gpu_only and not cuda.available():
        raise UserError(f"--backends {text}: {', '.join(gpu_only)} need an NVIDIA GPU with cuda-python "
                        f"({cuda.why_unavailable() or 'none found'}): use --backends onnxruntime-cpu or available")
    return names


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
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def mem_used() -> int:
    return cuda.mem_used_bytes() if cuda.available() else 0


def peak_mem_mb(held_bytes: int) -> float:
    """GPU: the device memory this contender holds (what its load and its own runs added: weights,
    sessions, buffers, arenas), the others loaded beside it left out. CPU: the process's peak RSS
    (every contender and the reference share the process)."""
    if cuda.available():
        return held_bytes / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def latents_for(cfg, batch, h, w) -> np.ndarray:
    shape = (batch, cfg.latent_channels, h // cfg.vae_factor, w // cfg.vae_factor)
    return np.random.default_rng(1234).standard_normal(shape, dtype=np.float32)


# ---- the prompt: one conditioning for every contender -----------------------------------------------

@dataclass(frozen=True)
class Prompt:
    text: str
    negative: str
    guidance: float


def is_demo(work_dir: Path, manifest: dict) -> bool:
    """An export of the shipped demo model: exported from it, or with its tokenizer."""
    from sdrt.demo import DEMO_MODEL
    source = manifest.get("source", {}).get("path")
    if source and Path(source).resolve() == DEMO_MODEL.resolve():
        return True
    mine, demo = Path(work_dir) / "tokenizer" / "vocab.json", DEMO_MODEL / "tokenizer" / "vocab.json"
    return mine.is_file() and demo.is_file() and mine.read_bytes() == demo.read_bytes()


def bench_prompt(work_dir: Path, manifest: dict) -> Prompt:
    """A prompt the model's tokenizer takes whole (bos + tokens + eos within its length), so that
    sdrt (which encodes long prompts in chunks) and diffusers (which truncates) condition alike:
    the demo model gets a caption of its world, with the demo's guidance and no negative prompt."""
    from sdrt.engine.tokenizer import ClipTokenizer
    tokenizer = ClipTokenizer.from_dir(Path(work_dir) / "tokenizer")
    if is_demo(work_dir, manifest):
        from sdrt.scenes import Scene
        prompt = Prompt(Scene("circle", "red", "blue", "large", "top left").caption, "", 5.0)
    else:
        prompt = Prompt(PROMPT, NEGATIVE, GUIDANCE)
    return Prompt(fit(prompt.text, tokenizer), fit(prompt.negative, tokenizer), prompt.guidance)


def fit(text: str, tokenizer) -> str:
    """`text` without its last words until bos + tokens + eos fit the tokenizer's length."""
    words = text.split()
    while words and len(tokenizer.token_ids(" ".join(words))) + 2 > tokenizer.model_max_length:
        words.pop()
    return " ".join(words)


# ---- contenders -----------------------------------------------------------------------------------

@dataclass
class Sample:
    """One timed generation: images (uint8 NHWC) and ms per stage (STAGES; None where not run),
    with the per-step times of the denoising loop."""
    images: np.ndarray
    stages: dict
    steps_ms: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


class SdrtContender:
    """One export on one backend (ONNX Runtime: with or without the attention-fused UNet)."""
    is_reference = False

    def __init__(self, work_dir: Path, backend: str, ort_fusion: bool):
        from sdrt.engine.pipeline import Pipeline
        self.work_dir = Path(work_dir)
        before, t = mem_used(), time.perf_counter()
        self.pipe = Pipeline(work_dir, backend=backend, ort_fusion=ort_fusion)
        self.load_s = time.perf_counter() - t
        self.held_bytes = max(mem_used() - before, 0)     # grows by what its own runs keep
        # ONNX Runtime with the UNet of onnx/ort/ (its attention fusion), where exported
        self.ort_fused = (ort_fusion and self.pipe.backend_name.startswith("onnxruntime")
                          and bool(self.pipe.manifest.get("variants", {}).get("ort")))
        self.name = f"sdrt {self.pipe.backend_name} ({self.work_dir.name}{', ORT fusion' if self.ort_fused else ''})"

    def run(self, prompt: Prompt, steps: int, h: int, w: int, batch: int, latents, inputs: dict) -> Sample:
        before = mem_used()
        r = self.pipe.generate(prompt.text, prompt.negative, steps, prompt.guidance, h, w, batch,
                               latents=latents, **inputs)
        self.held_bytes += max(mem_used() - before, 0)
        t = r.timings
        stages = {"tokenize": t["tokenize_ms"], "text_encoder": t["text_encoder_ms"],
                  "vae_encoder": t["vae_encoder_ms"] if mode_of(inputs) in ("img2img", "inpaint") else None,
                  "denoise": float(sum(t["steps_ms"])), "vae_decoder": t["vae_ms"], "total": t["total_ms"]}
        return Sample(r.images, stages, list(t["steps_ms"]), {"graph": t["graph"], "graph_error": t["graph_error"]})


class ReferenceContender:
    """diffusers eager (sdrt.benchmarks.reference), timed the same way."""
    is_reference = True

    def __init__(self, model_dir: Path):
        try:
            from sdrt.benchmarks.reference import Reference
            self.ref = Reference(model_dir)
        except ImportError as e:
            raise UserError(f"the diffusers reference needs the export extra ({e}): "
                            "pip install 'sdrt[export]', or pass --no-reference") from None
        self.name = self.ref.description

    def run(self, prompt: Prompt, steps: int, h: int, w: int, batch: int, latents, inputs: dict) -> Sample:
        images, t = self.ref.run(prompt.text, prompt.negative, steps, prompt.guidance, h, w, latents, **inputs)
        stages = {"tokenize": t["tokenize_ms"], "text_encoder": t["text_encoder_ms"],
                  "vae_encoder": t["vae_encoder_ms"], "denoise": t["denoise_ms"], "vae_decoder": t["vae_ms"],
                  "total": t["e2e_ms"]}
        return Sample(images, stages, list(t["steps_ms"]), {"peak_mem_mb": t["peak_mem_mb"]})

    def close(self) -> None:
        self.ref.close()


# ---- the measurement ------------------------------------------------------------------------------

def run_order(n_contenders: int, runs: int, interleave: bool) -> list[tuple[int, int]]:
    """(contender, run) in the order they are timed: A B A B ... interleaved, else A A ... B B ..."""
    if interleave:
        return [(c, r) for r in range(runs) for c in range(n_contenders)]
    return [(c, r) for c in range(n_contenders) for r in range(runs)]


def measure(contenders: list, configs: list, prompt: Prompt, steps: int, runs: int, warmup: int,
            interleave: bool, latents, inputs: dict) -> dict:
    """{(contender index, (h, w, batch)): [Sample, ...]}: per configuration, every contender warmed
    up, then `runs` timed generations each, in run_order."""
    samples: dict = {}
    for i, (h, w, batch) in enumerate(configs, 1):
        lat = latents(h, w, batch)
        where = f"[{i}/{len(configs)}] {h}x{w} batch {batch}"
        for c in contenders:
            if warmup:
                say(f"{where}: {c.name}: warm-up ...")
            for _ in range(warmup):
                c.run(prompt, steps, h, w, batch, lat, inputs)
        for c, r in run_order(len(contenders), runs, interleave):
            say(f"{where}: {contenders[c].name}: run {r + 1}/{runs}")
            samples.setdefault((c, (h, w, batch)), []).append(
                contenders[c].run(prompt, steps, h, w, batch, lat, inputs))
    return samples


def spread(values: list) -> dict | None:
    """{min, median, max} of the runs' values; None for a stage that did not run."""
    if not values or any(v is None for v in values):
        return None
    return {"min": float(np.min(values)), "median": float(np.median(values)), "max": float(np.max(values))}


def stage_stats(samples: list) -> dict:
    return {s: spread([x.stages[s] for x in samples]) for s in STAGES}


def median_of(stats: dict, stage: str) -> float | None:
    return stats[stage]["median"] if stats.get(stage) else None


def record(c, samples: list, ref_samples: list | None, ref_name: str | None, h: int, w: int, batch: int,
           steps: int, runs: int, prompt: Prompt, inputs: dict, interleave: bool, versions_: dict) -> dict:
    """The JSON record of one sdrt contender at one configuration (its reference figures beside)."""
    st = stage_stats(samples)
    ref = stage_stats(ref_samples) if ref_samples else None
    e2e = st["total"]["median"]
    last = samples[-1]
    pipe = c.pipe
    return {
        "device": device_name(), "backend": pipe.backend_name, "precision": mf.precision_label(pipe.manifest),
        "attention": pipe.manifest.get("attention", "decomposed"), "export": c.work_dir.name,
        "ort_fusion": c.ort_fused,
        "height": h, "width": w, "steps": steps, "batch": batch, "runs": runs,
        "mode": mode_of(inputs), "strength": inputs.get("strength"), "steps_run": len(last.steps_ms),
        "prompt": prompt.text, "negative": prompt.negative, "guidance": prompt.guidance,
        "interleaved": interleave,
        "stages": st,
        "e2e_ms": e2e, "e2e_min_ms": st["total"]["min"], "e2e_max_ms": st["total"]["max"],
        "unet_step_ms": float(np.median([s for x in samples for s in x.steps_ms])),
        "tokenize_ms": median_of(st, "tokenize"), "text_encoder_ms": median_of(st, "text_encoder"),
        "vae_encoder_ms": median_of(st, "vae_encoder"), "vae_ms": median_of(st, "vae_decoder"),
        "images_per_s": batch / (e2e / 1e3),
        "peak_mem_mb": peak_mem_mb(c.held_bytes), "load_s": c.load_s,
        "activation_mb": (pipe.backend.activation_bytes / 2 ** 20
                          if pipe.backend.activation_bytes is not None else None),
        "engine_build_s": _build_seconds(pipe.manifest, pipe.backend_name),
        "reference": ref_name,
        "reference_stages": ref,
        "reference_e2e_ms": ref["total"]["median"] if ref else None,
        "reference_unet_step_ms": (float(np.median([s for x in ref_samples for s in x.steps_ms]))
                                   if ref else None),
        "reference_peak_mem_mb": ref_samples[-1].extra["peak_mem_mb"] if ref else None,
        "speedup_e2e": ref["total"]["median"] / e2e if ref else None,
        "psnr_vs_reference": psnr(last.images, ref_samples[-1].images) if ref else None,
        "graph": last.extra["graph"],                     # sdrt | onnxruntime | none
        "graph_error": last.extra["graph_error"] or None,   # why not sdrt's own graph
        "versions": versions_}


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
    if inputs.get("noise_level") is not None:
        return "upscale"
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
    if cfg.upscaler:
        return upscale_inputs(image, mask, strength, cfg)
    image = image_input.load(image, "image").convert("RGB")
    mask = image_input.load(mask, "mask") if mask is not None else None
    src = image_input.prepare(image, mask, cfg.vae_factor)        # size and mask checks, one line each
    if strength is not None:
        start_index(steps, strength)
    return {"image": image, "mask": mask, "strength": strength}, (src.height, src.width)


def upscale_inputs(image, mask, strength, cfg) -> tuple[dict, tuple[int, int]]:
    """An upscaler export: the low-resolution image, the default noise level and fixed image noise
    (the same for sdrt and the reference); the size is the output's (vae_factor x the image's)."""
    from sdrt.engine import image_input, upscaler
    if mask is not None or strength is not None:
        raise UserError("--mask and --strength do not apply to an upscaler export: give --image alone")
    image = image_input.load(image, "image").convert("RGB")
    h, w = image_input.target_size(image, cfg.vae_factor, False)
    noise = np.random.default_rng(4321).standard_normal((1, 3, h, w), dtype=np.float32)
    return ({"image": image, "noise_level": upscaler.DEFAULT_NOISE_LEVEL, "image_noise": noise},
            (h * cfg.vae_factor, w * cfg.vae_factor))


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


def variants(names: list[str], manifest: dict) -> list[tuple[str, bool]]:
    """(backend, ort_fusion) pairs: ONNX Runtime backends run with and without onnx/ort/ when it
    was exported, so the attention fusion is measured before/after in the same run."""
    fused = bool(manifest.get("variants", {}).get("ort"))
    return [(n, f) for n in names for f in ((False, True) if fused and n.startswith("onnxruntime") else (True,))]


def bench(work_dirs: list | None = None, reference=None, backends: str = "available", sizes: str | None = None,
          steps: int = 50, batches: str = "1,4,8", runs: int = 5, warmup: int = 1,
          out=DEFAULT_OUT, no_reference: bool = False, image=None, mask=None,
          strength: float | None = None, interleave: bool | None = None) -> list:
    """Measure, print the table, write the results under `out`; returns the files written.
    sizes None: the model's own size (512x512 for SD 1.5), or the image's size with `image`
    (image to image; with `mask`, inpainting). interleave None: interleaved when there is more
    than one contender (several exports or backends, or a reference)."""
    from sdrt.benchmarks import report
    work_dirs, reference = demo_defaults(work_dirs, reference, no_reference)
    manifests = load_exports(work_dirs)
    cfg = mf.config(manifests[0])
    size_list = parse_sizes(sizes or f"{cfg.default_height}x{cfg.default_width}")
    batch_list = parse_ints(batches, "batches")
    if steps <= 0 or runs <= 0 or warmup < 0:
        raise UserError("--steps and --runs must be positive, --warmup not negative")
    names = [parse_backends(backends, m) for m in manifests]
    inputs, image_size = image_inputs(image, mask, strength, steps, cfg)
    if image_size is not None:
        if sizes is not None and size_list != [image_size]:
            raise UserError(f"--sizes {sizes}: with --image the size is the image's "
                            f"({image_size[0]}x{image_size[1]}); leave --sizes out")
        size_list = [image_size]
    if not no_reference:
        from sdrt.export.pipeline_folder import read_model_index
        read_model_index(reference)
    prompt = bench_prompt(work_dirs[0], manifests[0])
    configs = [(h, w, b) for h, w in size_list for b in batch_list]

    ref = None if no_reference else ReferenceContender(reference)     # first: the slowest to fail
    contenders = [SdrtContender(w, name, fused) for w, m, ns in zip(work_dirs, manifests, names)
                  for name, fused in variants(ns, m)] + ([ref] if ref else [])
    interleave = len(contenders) > 1 if interleave is None else interleave
    say(f"prompt: {prompt.text!r}, negative {prompt.negative!r}, guidance {prompt.guidance}; "
        f"{len(contenders)} contender(s), {'interleaved' if interleave else 'one after another'}")
    samples = measure(contenders, configs, prompt, steps, runs, warmup, interleave,
                      lambda h, w, b: latents_for(cfg, b, h, w), inputs)
    ref_index = len(contenders) - 1 if not no_reference else None
    v = versions()
    records = [record(c, samples[(i, (h, w, b))],
                      samples[(ref_index, (h, w, b))] if ref_index is not None else None,
                      contenders[ref_index].name if ref_index is not None else None,
                      h, w, b, steps, runs, prompt, inputs, interleave, v)
               for i, c in enumerate(contenders) if not c.is_reference for h, w, b in configs]
    if ref_index is not None:
        contenders[ref_index].close()
    paths = report.write(records, out)
    print(report.table(records))
    for p in paths:
        print(f"wrote {p}")
    return paths
