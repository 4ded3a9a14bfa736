"""Read a demo-domain image back into (shape, colour, background, size, position).

numpy only. The background is the nearest palette colour of most border pixels; the shape is the
set of pixels whose nearest palette colour differs from the background, reduced to its most common
colour. From that region:
  kind      triangle if most of its mass is in the lower half (an upright triangle puts 3/4 there),
            else square if it fills its box (fill ~1), else circle (fill ~pi/4)
  size      the box side: small 12 px, large 20 px
  position  the box centre against the nine centres of sdrt.scenes
An image k times the scenes' size (the ×4 upscaler's 128x128) is read in the scenes' pixels: sizes
and centres divided by k.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt import scenes

PALETTE = np.array(list(scenes.PALETTE.values()), np.float32)  # [8, 3] in scenes.COLOURS order
FIELDS = ("colour", "background", "shape", "size", "position")


@dataclass(frozen=True)
class Reading:
    shape: str | None
    colour: str | None
    background: str
    size: str | None
    position: str | None


def nearest_colour_index(pixels: np.ndarray) -> np.ndarray:
    """[...] palette index of each RGB pixel [..., 3] (Euclidean in RGB)."""
    d = ((pixels[..., None, :].astype(np.float32) - PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def border(labels: np.ndarray, width: int = 2) -> np.ndarray:
    return np.concatenate([labels[:width].ravel(), labels[-width:].ravel(),
                           labels[:, :width].ravel(), labels[:, -width:].ravel()])


def most_common(values: np.ndarray) -> int:
    return int(np.bincount(values, minlength=len(PALETTE)).argmax())


def solid_rows(mask: np.ndarray, axis: int, scale: int = 1) -> np.ndarray:
    """Indices of rows (axis=1) or columns (axis=0) holding at least 2 region pixels (2 x scale):
    stray pixels do not stretch the box."""
    return np.flatnonzero(mask.sum(axis) >= 2 * scale)


def kind_of(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> str:
    box = mask[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]
    rows = box.sum(1)
    lower = rows[len(rows) // 2:].sum() / max(rows.sum(), 1)
    if lower > 0.62:
        return "triangle"
    return "square" if box.mean() > 0.9 else "circle"


def size_of(ys: np.ndarray, xs: np.ndarray, scale: int = 1) -> str:
    side = (max(ys[-1] - ys[0], xs[-1] - xs[0]) + 1) / scale
    return "small" if side < (scenes.SIZES["small"] + scenes.SIZES["large"]) / 2 else "large"


def position_of(ys: np.ndarray, xs: np.ndarray, size: str, scale: int = 1) -> str:
    """The scene position whose box centre is nearest this box's centre (in the scenes' pixels)."""
    cy, cx = ((ys[0] + ys[-1]) / 2 + 0.5) / scale - 0.5, ((xs[0] + xs[-1]) / 2 + 0.5) / scale - 0.5
    centres = {p: scenes.centre_xy(size, p) for p in scenes.POSITIONS}
    # a box drawn around centre c spans c - half .. c + half - 1: its centre is c - 0.5
    return min(centres, key=lambda p: (centres[p][0] - 0.5 - cx) ** 2 + (centres[p][1] - 0.5 - cy) ** 2)


def read(image: np.ndarray) -> Reading:
    """uint8 [H, W, 3] (the scenes' size, or a whole multiple of it) -> what it shows."""
    scale = max(1, image.shape[0] // scenes.SIZE)
    labels = nearest_colour_index(image)
    bg = most_common(border(labels))
    background = scenes.COLOURS[bg]
    differing = labels[labels != bg]
    if differing.size < 8 * scale * scale:
        return Reading(None, None, background, None, None)
    fg = most_common(differing)
    mask = labels == fg
    ys, xs = solid_rows(mask, 1, scale), solid_rows(mask, 0, scale)
    if len(ys) < 2 or len(xs) < 2:
        return Reading(None, scenes.COLOURS[fg], background, None, None)
    size = size_of(ys, xs, scale)
    return Reading(kind_of(mask, ys, xs), scenes.COLOURS[fg], background, size,
                   position_of(ys, xs, size, scale))


def correct(reading: Reading, scene: scenes.Scene) -> dict[str, bool]:
    """Per field: does the image show what the caption says?"""
    return {f: getattr(reading, f) == getattr(scene, f) for f in FIELDS}
