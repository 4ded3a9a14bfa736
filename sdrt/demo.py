"""`sdrt demo`: the embedded default, end to end.

The trained demo model (sdrt/demo_model/, shipped with the package: shapes on plain backgrounds,
32x32, see sdrt.export.train_demo) -> export FP32 once (cached in --dir) -> generate eight example
captions (or --prompt) on the best available backend -> a grid with each caption under its image
-> the timing table.
"""
from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np

from sdrt import manifest as mf
from sdrt.errors import UserError
from sdrt.fileio import atomic_dir

DEMO_MODEL = Path(__file__).with_name("demo_model")
EXPORT_NAME = "demo-fp32"
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


class ExportExtraMissing(UserError, ImportError):
    """One line for the CLI (UserError); an ImportError for callers that fall back without torch
    (sdrt doctor)."""


def demo_export(root: Path = Path("sdrt-demo")) -> Path:
    """The demo model's FP32 export under root (made on first use; needs the export extra then);
    returns its WORK_DIR."""
    work_dir = Path(root) / EXPORT_NAME
    if (work_dir / mf.NAME).is_file():
        return work_dir
    if not (DEMO_MODEL / "model_index.json").is_file():
        raise UserError(f"the demo model is missing from {DEMO_MODEL}: reinstall sdrt")
    try:
        from sdrt.export.export import export
    except ImportError as e:
        raise ExportExtraMissing(f"exporting the demo model needs the export extra ({e}): "
                                 "pip install 'sdrt[export]'") from None
    print(f"[demo] sdrt export {DEMO_MODEL} {work_dir} --precision fp32", file=sys.stderr)
    export(DEMO_MODEL, work_dir, precision="fp32")
    return work_dir


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


def main(root: Path = Path("sdrt-demo"), prompts=None, backend: str = "auto", steps: int = 25,
         guidance: float = 5.0, seed: int = 0) -> Path:
    """Export the demo model if needed, draw each prompt (seed, seed + 1, ...; seed -1: a random
    first seed, printed), write the captioned grid to root/demo.png and print the last generation's
    timing table."""
    from sdrt.engine.pipeline import Pipeline
    from sdrt.engine.request import resolve_seed
    from sdrt.engine.timing import timing_table
    from sdrt.fileio import save_images
    prompts = list(prompts or PROMPTS)
    seed = resolve_seed(seed)
    work_dir = demo_export(root)
    pipe = Pipeline(work_dir, backend=backend)
    print(f"[demo] generating {len(prompts)} image(s) on {pipe.backend_name}, {steps} steps, "
          f"guidance {guidance}, seeds {seed}..{seed + len(prompts) - 1}", file=sys.stderr)
    results = [pipe.generate(p, steps=steps, guidance=guidance, seed=seed + i) for i, p in enumerate(prompts)]
    out = Path(root) / "demo.png"
    save_images([grid([r.images[0] for r in results], prompts)], [out])
    print(f"wrote {out}")
    print(timing_table(results[-1].timings))
    return out
