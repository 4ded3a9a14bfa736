"""`sdrt demo`: the embedded default, end to end.

The trained demo model (sdrt/demo_model/, shipped with the package: shapes on plain backgrounds,
32x32, see sdrt.export.train_demo) -> export FP32 once (cached in --dir) -> generate eight example
captions (or --prompt) on the best available backend -> the demo's ×4 upscaler (sdrt/demo_upscaler/,
a StableDiffusionUpscalePipeline folder, sdrt.export.train_upscaler; exported once too) takes each
32x32 image to 128x128 -> a grid with each caption under its image -> the timing table of both
stages. `--no-upscale`: the 32x32 images, shown 4x (nearest). One --prompt with --out FILE writes
that image alone.
"""
from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np

from sdrt import manifest as mf
from sdrt.errors import UserError
from sdrt.extras import require
from sdrt.fileio import atomic_dir

DEMO_MODEL = Path(__file__).with_name("demo_model")
EXPORT_NAME = "demo-fp32"
DEMO_UPSCALER = Path(__file__).with_name("demo_upscaler")
UPSCALER_EXPORT_NAME = "demo-upscaler-fp32"
# how the demo (and `sdrt eval --upscaler`) runs the upscaler: v-prediction DDIM steps, no
# classifier-free guidance, and the noise level added to the 32x32 image (the shipped model was
# trained on 0..MAX_NOISE_LEVEL). On 8 held-out scenes 25 steps were no closer to the originals than
# 10, and guidance 3 was further (the low-resolution image says almost everything; the caption
# conditions the upscaler weakly).
UPSCALE_STEPS, UPSCALE_GUIDANCE, NOISE_LEVEL, MAX_NOISE_LEVEL = 10, 1.0, 20, 350
PROMPTS = (
    "a small red circle on a blue background",
    "a large yellow triangle on a black background, top left",
    "a large white square on a green background",
    "a small purple triangle on a yellow background, bottom right",
    "a large orange circle on a purple background, right",
    "a small blue square on a white background, top",
    "a large green circle on a red background, bottom left",
    "a small black triangle on an orange background",
)
TILE, COLUMNS = 128, 4   # each 32x32 image shown 4x, nearest neighbour: the pixels are the answer


def demo_export(root: Path = Path("sdrt-demo"), model: Path = DEMO_MODEL, name: str = EXPORT_NAME) -> Path:
    """The demo model's (or, with model=DEMO_UPSCALER, name=UPSCALER_EXPORT_NAME, its upscaler's)
    FP32 export under root (made on first use; needs the export extra then); returns its WORK_DIR."""
    work_dir = Path(root) / name
    if (work_dir / mf.NAME).is_file():
        return work_dir
    if not (model / "model_index.json").is_file():
        raise UserError(f"the demo model is missing from {model}: reinstall sdrt")
    from sdrt.export.single_file import go_offline
    go_offline()
    require("export", "exporting the demo model")   # ExtraMissing: a UserError and an ImportError
    from sdrt.export.export import export
    print(f"[demo] sdrt export {model} {work_dir} --precision fp32", file=sys.stderr)
    export(model, work_dir, precision="fp32")
    return work_dir


def runtime_upscales() -> bool:
    """Whether this sdrt's runtime runs ×4 upscaler exports (contract.Task.upscaling)."""
    from sdrt.contract import Task
    return hasattr(Task, "upscaling")


def copy_demo_model(out_dir: Path, force: bool = False) -> Path:
    """`sdrt init DIR --arch demo`: the trained pipeline folder, copied atomically."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists: choose a new folder or pass --force to replace it")
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(DEMO_MODEL, tmp, dirs_exist_ok=True)
    return out_dir


def captioned(image: np.ndarray, caption: str):
    """One grid tile: the image scaled to TILE px (nearest), the caption wrapped under it."""
    from PIL import Image, ImageDraw, ImageFont
    lines = textwrap.wrap(caption, width=21)[:4]
    tile = Image.new("RGB", (TILE, TILE + 12 * 4 + 6), (255, 255, 255))
    tile.paste(Image.fromarray(image).resize((TILE, TILE), Image.NEAREST))
    draw, font = ImageDraw.Draw(tile), ImageFont.load_default()
    for i, line in enumerate(lines):
        draw.text((2, TILE + 3 + 12 * i), line, fill=(0, 0, 0), font=font)
    return tile


def grid(images, captions: list[str]):
    from PIL import Image
    tiles = [captioned(img, c) for img, c in zip(images, captions)]
    cols = min(COLUMNS, len(tiles))
    rows = -(-len(tiles) // cols)
    w, h = tiles[0].size
    out = Image.new("RGB", (cols * (w + 4) + 4, rows * (h + 4) + 4), (255, 255, 255))
    for i, tile in enumerate(tiles):
        out.paste(tile, (4 + (i % cols) * (w + 4), 4 + (i // cols) * (h + 4)))
    return out


def stage_rows(results: list) -> list[tuple[str, float]]:
    """One stage's rows: setup from its first run (sessions, buffers, bindings, graphs: later runs
    reuse them), the rest as the median over all the images."""
    first = results[0].timings
    med = {k: float(np.median([r.timings[k] for r in results]))
           for k in ("tokenize_ms", "text_encoder_ms", "denoise_ms", "unet_step_ms", "vae_ms", "total_ms")}
    return [("  setup (first image)", first["setup_ms"]), ("  tokenize", med["tokenize_ms"]),
            ("  text encoder", med["text_encoder_ms"]),
            (f"  denoise ({len(first['steps_ms'])} steps)", med["denoise_ms"]),
            ("    per step", med["unet_step_ms"]), ("  vae decoder", med["vae_ms"]),
            ("  total per image", med["total_ms"])]


def timing_table(results: list, wall_s: float, upscaled: list | None = None) -> str:
    """The demo's timing table: text to image, then the ×4 upscaler when it ran, each stage as the
    median over all the images, and the wall time of the whole run. No VAE encoder row: neither
    stage encodes an image."""
    n = len(results)
    size = lambda rs: "x".join(map(str, rs[0].images.shape[1:3]))
    lines = [f"backend: {results[0].timings['backend']}; per-image stages: median over {n} image(s)",
             f"{'stage':<28}{'ms':>12}", f"text to image ({size(results)})"]
    lines += [f"{name:<28}{v:>12.2f}" for name, v in stage_rows(results)]
    if upscaled:
        lines.append(f"x4 upscaler ({size(results)} -> {size(upscaled)})")
        lines += [f"{name:<28}{v:>12.2f}" for name, v in stage_rows(upscaled)]
    lines.append(f"{f'all {n} images (wall)':<28}{wall_s * 1e3:>12.2f}")
    return "\n".join(lines)


def upscaler_pipeline(root: Path, backend: str):
    """The demo upscaler's Pipeline (exported on first use)."""
    from sdrt.engine.pipeline import Pipeline
    return Pipeline(demo_export(root, DEMO_UPSCALER, UPSCALER_EXPORT_NAME), backend=backend)


def upscale(pipe, results: list, prompts: list[str], seed: int) -> list:
    """Each 32x32 image through the ×4 upscaler (image i: seed + i for the upscaler's noise)."""
    return [pipe.generate(p, image=r.images[0], noise_level=NOISE_LEVEL, steps=UPSCALE_STEPS,
                          guidance=UPSCALE_GUIDANCE, seed=seed + i)
            for i, (p, r) in enumerate(zip(prompts, results))]


def main(root: Path = Path("sdrt-demo"), prompts=None, backend: str = "auto", steps: int = 25,
         guidance: float = 5.0, seed: int = 0, out: Path | None = None, upscale_images: bool = True) -> Path:
    """Export the demo model (and its upscaler) if needed, draw each prompt (seed, seed + 1, ...;
    seed -1: a random first seed, printed), upscale each image to 128x128 (unless upscale_images is
    False), write the captioned grid (default: root/demo.png for the example captions,
    root/prompts.png for your own, so one never replaces the other; one prompt with `out` given:
    that image alone) and print the timing table."""
    import time

    from sdrt.engine.pipeline import Pipeline
    from sdrt.engine.request import GenerateRequest, resolve_seed
    from sdrt.fileio import image_format, save_images
    single = out is not None and prompts is not None and len(prompts) == 1
    out = Path(out) if out is not None else Path(root) / ("prompts.png" if prompts else "demo.png")
    image_format(out)
    prompts = list(prompts or PROMPTS)
    GenerateRequest(prompts[0], steps=steps, guidance=guidance)   # bad --steps/--guidance: before any export
    if upscale_images and not runtime_upscales():
        print("[demo] this sdrt's runtime cannot run x4 upscaler exports yet: drawing at 32x32 (as --no-upscale)",
              file=sys.stderr)
        upscale_images = False
    seed = resolve_seed(seed)
    work_dir = demo_export(root)
    pipe = Pipeline(work_dir, backend=backend)
    up_pipe = upscaler_pipeline(root, backend) if upscale_images else None
    print(f"[demo] generating {len(prompts)} image(s) on {pipe.backend_name}, {steps} steps, "
          f"guidance {guidance}, seeds {seed}..{seed + len(prompts) - 1}"
          + (f"; then x4 to 128x128, {UPSCALE_STEPS} steps, noise level {NOISE_LEVEL}" if up_pipe else ""),
          file=sys.stderr)
    t0 = time.perf_counter()
    results = [pipe.generate(p, steps=steps, guidance=guidance, seed=seed + i) for i, p in enumerate(prompts)]
    upscaled = upscale(up_pipe, results, prompts, seed) if up_pipe else None
    wall = time.perf_counter() - t0
    images = [r.images[0] for r in (upscaled or results)]
    if single:
        from PIL import Image
        save_images([Image.fromarray(images[0])], [out])
    else:
        save_images([grid(images, prompts)], [out])
    print(f"wrote {out}")
    print(timing_table(results, wall, upscaled))
    return out
