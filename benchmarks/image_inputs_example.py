"""The README's image-to-image and inpainting example, made with the demo model on ONNX Runtime CPU:

    python -m sdrt.benchmarks.image_inputs_example [OUT.png]    (default ./sdrt-results/demo-image-inputs.png)

text to image -> image to image with another caption (strength 0.6) -> inpainting of the shape's
square (white = repaint) with a third caption. Fixed seeds, so the figure is reproducible.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sdrt.demo import demo_export, grid
from sdrt.engine.pipeline import Pipeline
from sdrt.fileio import save_images

STEPS, GUIDANCE = 25, 5.0
START = "a large white square on a green background"
IMG2IMG = "a large white square on a red background"
INPAINT = "a large yellow circle on a green background"


def centre_mask(size: int, margin: int) -> np.ndarray:
    """White (repaint) square in the middle, black (keep) border: uint8 greyscale."""
    mask = np.zeros((size, size), np.uint8)
    mask[margin:size - margin, margin:size - margin] = 255
    return mask


def main(out: Path = Path("sdrt-results/demo-image-inputs.png")) -> Path:
    pipe = Pipeline(demo_export(), backend="onnxruntime-cpu")
    source = pipe.generate(START, steps=STEPS, guidance=GUIDANCE, seed=2).images[0]
    moved = pipe.generate(IMG2IMG, steps=STEPS, guidance=GUIDANCE, seed=3, image=source, strength=0.6).images[0]
    mask = centre_mask(source.shape[0], source.shape[0] // 6)
    filled = pipe.generate(INPAINT, steps=STEPS, guidance=GUIDANCE, seed=4, image=source, mask=mask).images[0]
    tiles = [source, np.repeat(mask[..., None], 3, axis=2), moved, filled]
    captions = [f"1. {START}", "2. mask (white = repaint)", f"3. from 1, strength 0.6: {IMG2IMG}",
                f"4. 1 + 2 inpainted: {INPAINT}"]
    save_images([grid(tiles, captions)], [out])
    return out


if __name__ == "__main__":
    print(f"wrote {main(*map(Path, sys.argv[1:]))}")
