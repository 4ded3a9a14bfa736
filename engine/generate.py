"""`sdrt generate`: the CLI face of Pipeline.generate, writing PNGs atomically."""
from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from sdrt.errors import UserError
from sdrt.fileio import atomic_path


def load_latents(path: Path | None):
    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read latents {path}: {e}") from None


def output_paths(out: Path, batch: int) -> list[Path]:
    """out.png for one image; out-0.png ... out-{B-1}.png for a batch."""
    if batch == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(batch)]


def save_images(images: list, paths: list[Path]) -> None:
    """All or nothing: every image goes to a temp file first; all are renamed in only when every
    one was written (the ExitStack closes the atomic paths together)."""
    path = paths[0]
    try:
        with ExitStack() as stack:
            for img, path in zip(images, paths):
                path.parent.mkdir(parents=True, exist_ok=True)
                img.save(stack.enter_context(atomic_path(path, ".png")), format="PNG")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def timing_table(t: dict) -> str:
    steps = t["steps_ms"]
    rows = [("setup (first call)", t["setup_ms"]), ("tokenize", t["tokenize_ms"]), ("text encoder", t["text_encoder_ms"]),
            (f"denoise ({len(steps)} steps)", t["denoise_ms"]),
            ("  per step (median)", t["unet_step_ms"]),
            ("  per step (min / max)", f"{min(steps):.2f} / {max(steps):.2f}"),
            ("vae decoder", t["vae_ms"]), ("total", t["total_ms"])]
    lines = [f"backend: {t['backend']}", f"{'stage':<24}{'ms':>12}"]
    for name, v in rows:
        lines.append(f"{name:<24}{v if isinstance(v, str) else f'{v:.2f}':>12}")
    return "\n".join(lines)


def main(a) -> None:
    from sdrt.engine.pipeline import Pipeline
    if a.out.suffix.lower() not in ("", ".png"):
        raise UserError(f"--out {a.out}: sdrt writes PNG files, give a .png path")
    latents = load_latents(a.latents)
    from sdrt.engine.lora import parse_spec
    pipe = Pipeline(a.work_dir, backend=a.backend, loras=[parse_spec(x) for x in getattr(a, "lora", [])])
    result = pipe.generate(a.prompt, negative=a.negative, steps=a.steps, guidance=a.guidance,
                           height=a.height, width=a.width, batch=a.batch, seed=a.seed, latents=latents)
    paths = output_paths(a.out, a.batch)
    save_images(result.pil(), paths)
    for p in paths:
        print(f"wrote {p}")
    if a.timings:
        print(timing_table(result.timings), file=sys.stderr)
