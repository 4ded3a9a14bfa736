"""`sdrt generate`: the CLI face of Pipeline.generate (text to image, image to image with --image,
inpainting with --image --mask), writing PNGs atomically."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sdrt.errors import UserError
from sdrt.fileio import image_format, save_images


def load_latents(path: Path | None):
    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read latents {path}: {e}") from None


def output_paths(out: Path, batch: int) -> list[Path]:
    """out.png for one image; out-0.png ... out-{B-1}.png for a batch (any image extension)."""
    if batch == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(batch)]


def generate_files(work_dir: Path, prompt: str, out: Path, backend: str = "auto", negative: str = "",
                   steps: int = 50, guidance: float = 7.5, height: int | None = None,
                   width: int | None = None, batch: int = 1, seed: int | None = None,
                   latents: Path | None = None, timings: bool = False, vae_batch: int | None = None,
                   clip_skip: int = 1, embeddings=(), loras=(), image: Path | None = None,
                   mask: Path | None = None, strength: float | None = None, resize: bool = False) -> list[Path]:
    """Generate and write out.png (out-0.png ... for a batch); timings: the table on stderr.
    latents: the initial noise (.npy); embeddings: textual-inversion files, "FILE[:TOKEN]" each;
    loras: "FILE[:SCALE]" strings (or (path, scale) pairs); image / mask / strength / resize:
    Pipeline.generate's."""
    from sdrt.engine.lora import parse_spec
    from sdrt.engine.pipeline import Pipeline
    from sdrt.engine.timing import timing_table
    image_format(out)                    # PNG, JPEG or WebP by extension, else one line now
    noise = load_latents(latents)
    if mask is not None and image is None:
        raise UserError("--mask needs --image: inpainting repaints the white part of the mask in the image")
    if strength is not None and image is None:
        raise UserError("--strength needs --image (image to image or inpainting)")
    pipe = Pipeline(work_dir, backend=backend, embeddings=embeddings,
                    loras=[parse_spec(x) if isinstance(x, str) else x for x in loras])
    result = pipe.generate(prompt, negative=negative, steps=steps, guidance=guidance,
                           height=height, width=width, batch=batch, seed=seed, latents=noise,
                           vae_batch=vae_batch, clip_skip=clip_skip, image=image, mask=mask,
                           strength=strength, resize=resize)
    paths = output_paths(out, batch)
    save_images(result.pil(), paths)
    for p in paths:
        print(f"wrote {p}")
    if timings:
        print(timing_table(result.timings), file=sys.stderr)
    return paths
