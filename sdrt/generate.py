"""`sdrt generate`: the CLI face of Pipeline.run (text to image, image to image with --image,
inpainting with --image --mask), writing PNGs atomically."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sdrt.errors import UserError
from sdrt.fileio import save_images


def load_latents(path: Path | None, what: str = "latents"):
    """A .npy (--latents, --noise), or None."""
    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from None


def output_paths(out: Path, batch: int) -> list[Path]:
    """out.png for one image; out-0.png ... out-{B-1}.png for a batch."""
    if batch == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(batch)]


def generate_files(work_dir: Path, request, out: Path, backend: str = "auto", timings: bool = False) -> list[Path]:
    """Run `request` (a sdrt.engine.request.GenerateRequest) and write out.png (out-0.png ... for a
    batch); prints the seed used; timings: the table on stderr. The request's embeddings and LoRAs
    are loaded with the pipeline (bad files fail before any session is made)."""
    from sdrt.engine.pipeline import Pipeline
    from sdrt.engine.timing import timing_table
    if out.suffix.lower() not in ("", ".png"):
        raise UserError(f"--out {out}: sdrt writes PNG files, give a .png path")
    pipe = Pipeline(work_dir, backend=backend, embeddings=request.embeddings or (), loras=request.loras or ())
    result = pipe.run(request)
    paths = output_paths(out, request.batch)
    save_images(result.pil(), paths)
    for p in paths:
        print(f"wrote {p}")
    if result.seed is not None:
        print(f"seed {result.seed}")
    if timings:
        print(timing_table(result.timings), file=sys.stderr)
    return paths
