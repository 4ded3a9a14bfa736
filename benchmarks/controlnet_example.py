"""The README's ControlNet example, made by sdrt on ONNX Runtime CPU:

    python -m sdrt.benchmarks.controlnet_example [OUT.png]

The demo model with a ControlNet made for it here: its encoder copied from the demo UNet (as
ControlNet training starts) and its zero-initialised convolutions random, so it is UNTRAINED: it
shows the mechanism (the conditioning image's structure entering the image, more with a larger
scale, and a step window), not what a trained ControlNet does. Export with --controlnet (cached
under sdrt-demo/), then one caption and seed at scales 0, 0.5, 1 and 1 within the first half of the
steps.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sdrt import manifest as mf
from sdrt.demo import DEMO_MODEL, grid
from sdrt.engine.pipeline import Pipeline
from sdrt.fileio import save_images

STEPS, GUIDANCE, SEED = 25, 5.0, 2
CAPTION = "a large white square on a green background"
ROOT = Path("sdrt-demo")


def rings(size: int = 32) -> np.ndarray:
    """The conditioning image: two white rings on black (an edge-map-like picture)."""
    y, x = np.mgrid[0:size, 0:size]
    r = np.hypot(y - size / 2, x - size / 2)
    a = (((r > 5) & (r < 7)) | ((r > 11) & (r < 13))).astype(np.uint8) * 255
    return np.repeat(a[..., None], 3, axis=2)


def controlnet_export() -> Path:
    work = ROOT / "demo-controlnet-fp32"
    if (work / mf.NAME).is_file():
        return work
    from diffusers import UNet2DConditionModel

    from sdrt.export.export import export
    from sdrt.export.init_models import random_controlnet
    cn_dir = ROOT / "demo-controlnet"
    unet = UNet2DConditionModel.from_pretrained(DEMO_MODEL / "unet")
    random_controlnet(unet, seed=0, scale=0.3, embedding_channels=(8, 16, 16), copy_unet=True).save_pretrained(
        cn_dir, safe_serialization=True)
    return export(DEMO_MODEL, work, precision="fp32", controlnets=[cn_dir])


def main(out: Path = Path("benchmarks/results/demo-controlnet.png")) -> Path:
    pipe = Pipeline(controlnet_export(), backend="onnxruntime-cpu")
    cond = rings(pipe.config.default_height)
    runs = [("scale 0", [(cond, 0.0)]), ("scale 0.5", [(cond, 0.5)]), ("scale 1", [(cond, 1.0)]),
            ("scale 1, steps 0-50 %", [(cond, 1.0, 0.0, 0.5)])]
    tiles = [cond] + [pipe.generate(CAPTION, steps=STEPS, guidance=GUIDANCE, seed=SEED, control=c).images[0]
                      for _, c in runs]
    captions = ["control image"] + [f"{name}: {CAPTION}" for name, _ in runs]
    save_images([grid(tiles, captions)], [out])
    return out


if __name__ == "__main__":
    print(f"wrote {main(*map(Path, sys.argv[1:]))}")
