"""The demo's ×4 upscaler, measured (`sdrt eval WORK_DIR --upscaler UP`).

Super-resolution: scenes drawn at 128x128 (`scenes.render(s, scale=4)`), downsampled to 32x32
(`scenes.downsample`, bicubic), upscaled back by the model and by bicubic interpolation; PSNR and
SSIM of each against the 128x128 original. The text-to-image side (the checker's accuracies on the
upscaled images) is in benchmarks/eval.py.

UP is an sdrt export of the upscaler (a work folder: the runtime) or its diffusers folder
(StableDiffusionUpscalePipeline: diffusers' own pipeline, the reference; needs the export extra).
numpy only here; torch is imported by the diffusers path alone.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from sdrt import scenes
from sdrt.errors import UserError

SCALE = 4
NOISE_LEVEL = 20          # the low-resolution image's noise level (diffusers' default for the ×4 upscaler)


# --- image metrics ------------------------------------------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 image stacks on the 0..255 scale, over every pixel."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


def _gaussian_blur(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """[H, W] 'valid' separable Gaussian filter (window 11)."""
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    rows = np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 1, x)
    return np.apply_along_axis(lambda c: np.convolve(c, k, mode="valid"), 0, rows)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window 11, σ 1.5, K1 0.01, K2 0.03, L 255) of two
    uint8 [H, W, 3] images, averaged over the channels."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        mx, my = _gaussian_blur(x), _gaussian_blur(y)
        vx = _gaussian_blur(x * x) - mx * mx
        vy = _gaussian_blur(y * y) - my * my
        cxy = _gaussian_blur(x * y) - mx * my
        out.append(np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))))
    return float(np.mean(out))


def bicubic(low: np.ndarray, factor: int = SCALE) -> np.ndarray:
    """uint8 [h * factor, w * factor, 3]: pillow's bicubic upscaling."""
    from PIL import Image
    h, w = low.shape[:2]
    return np.asarray(Image.fromarray(low).resize((w * factor, h * factor), Image.BICUBIC))


# --- the upscaler, through sdrt or diffusers ----------------------------------------------------

class SdrtUpscaler:
    """An export of the upscaler on sdrt's runtime."""

    def __init__(self, work_dir: Path, backend: str, steps: int, guidance: float, noise_level: int):
        from sdrt.engine.pipeline import Pipeline
        self.pipe = Pipeline(work_dir, backend=backend)
        self.name = f"sdrt {self.pipe.backend_name}"
        self.steps, self.guidance, self.noise_level = steps, guidance, noise_level

    def upscale(self, low: np.ndarray, prompt: str, seed: int):
        """(uint8 [4h, 4w, 3], the run's timings)"""
        r = self.pipe.generate(prompt, image=low, noise_level=self.noise_level, steps=self.steps,
                               guidance=self.guidance, seed=seed)
        return r.images[0], r.timings


class DiffusersUpscaler:
    """The upscaler's diffusers folder on diffusers' own StableDiffusionUpscalePipeline (FP32, CPU)."""

    def __init__(self, folder: Path, steps: int, guidance: float, noise_level: int):
        from sdrt.export.single_file import go_offline
        go_offline()
        from sdrt.extras import require
        require("export", "the upscaler on diffusers (a pipeline folder; an sdrt export of it needs no torch)")
        import torch
        from diffusers import StableDiffusionUpscalePipeline

        from sdrt.export.pipeline_folder import quiet
        quiet()
        torch.set_num_threads(1)          # as training: on shared cores one thread is the faster
        self.torch = torch
        self.pipe = StableDiffusionUpscalePipeline.from_pretrained(folder)
        self.pipe.set_progress_bar_config(disable=True)
        self.name = "diffusers (torch CPU)"
        self.steps, self.guidance, self.noise_level = steps, guidance, noise_level

    def upscale(self, low: np.ndarray, prompt: str, seed: int):
        from PIL import Image
        t0 = time.perf_counter()
        g = self.torch.Generator().manual_seed(seed)
        out = self.pipe(prompt, image=Image.fromarray(low), num_inference_steps=self.steps,
                        guidance_scale=self.guidance, noise_level=self.noise_level, generator=g,
                        output_type="np").images[0]
        ms = (time.perf_counter() - t0) * 1e3
        return (out * 255).round().clip(0, 255).astype(np.uint8), {"total_ms": ms}


def open_upscaler(path: Path, backend: str = "auto", steps: int = 20, guidance: float = 1.0,
                  noise_level: int = NOISE_LEVEL):
    """An sdrt export (manifest.json) -> the runtime; a diffusers upscale folder -> diffusers."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return SdrtUpscaler(path, backend, steps, guidance, noise_level)
    index = path / "model_index.json"
    if index.is_file() and "StableDiffusionUpscalePipeline" in index.read_text():
        return DiffusersUpscaler(path, steps, guidance, noise_level)
    raise UserError(f"--upscaler {path}: not an sdrt export (no manifest.json) nor a diffusers "
                    f"StableDiffusionUpscalePipeline folder: give the ×4 upscaler's export or folder "
                    f"(the demo's: {Path(__file__).resolve().parents[1] / 'sdrt' / 'demo_upscaler'})")


def upscale_all(upscaler, lows: np.ndarray, prompts: list[str], seed: int, what: str) -> np.ndarray:
    """Image i upscaled with seed + i; uint8 [N, 4h, 4w, 3]."""
    out, t0 = [], time.perf_counter()
    for i, (low, p) in enumerate(zip(lows, prompts)):
        out.append(upscaler.upscale(low, p, seed + i)[0])
        print(f"\r[eval] upscaling {what}: {i + 1}/{len(lows)}, {time.perf_counter() - t0:.0f}s", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return np.stack(out)


def super_resolution(upscaler, scene_list, seed: int) -> dict:
    """128x128 renders -> 32x32 -> 128x128 by the model and by bicubic: PSNR and SSIM against the
    renders (means over the images; PSNR over all pixels)."""
    high = np.stack([scenes.render(s, scale=SCALE) for s in scene_list])
    low = np.stack([scenes.downsample(h, SCALE) for h in high])
    model = upscale_all(upscaler, low, [s.caption for s in scene_list], seed, "downsampled renders")
    cubic = np.stack([bicubic(x) for x in low])
    return {"n": len(scene_list), "input": "scenes.render(scale=4) -> scenes.downsample (bicubic) -> 32x32",
            "upscaler": {"psnr_db": psnr(model, high), "ssim": float(np.mean([ssim(a, b) for a, b in zip(model, high)]))},
            "bicubic": {"psnr_db": psnr(cubic, high), "ssim": float(np.mean([ssim(a, b) for a, b in zip(cubic, high)]))}}
