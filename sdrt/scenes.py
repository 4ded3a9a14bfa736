"""The demo model's world: one shape on a plain background, and its English caption.

Every scene is (shape, colour, background, size, position), drawn exactly (no anti-aliasing) from a
fixed palette, so anyone can check an image by reading pixel values. Some (colour, shape, background)
triples are held out of training to measure generalisation. numpy + pillow only: training (torch),
the checker and `sdrt eval` all read this one file.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # image side in pixels (64 would not train in an hour on 2 CPU cores)

PALETTE = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
    "purple": (140, 60, 180), "orange": (250, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 12, "large": 20}  # bounding-box side in pixels
POSITIONS = ("centre", "top", "bottom", "left", "right", "top left", "top right", "bottom left", "bottom right")

# (colour, shape, background) triples never seen in training: every colour, shape and background
# still appears in training, only these combinations do not.
HELD_OUT = (
    ("green", "triangle", "white"), ("blue", "square", "yellow"), ("yellow", "circle", "purple"),
    ("purple", "triangle", "orange"), ("orange", "square", "black"), ("white", "circle", "green"),
    ("black", "triangle", "red"), ("red", "square", "purple"), ("green", "circle", "orange"),
    ("blue", "triangle", "black"), ("yellow", "square", "red"), ("purple", "circle", "white"),
)

# the words of every caption, for the tokenizer
WORDS = ("a", "an", "on", "background", ",", *SIZES, *COLOURS, *SHAPES,
         *sorted({w for p in POSITIONS for w in p.split()}))


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str = "small"
    position: str = "centre"

    @property
    def caption(self) -> str:
        """"a small red circle on a blue background" + ", top left" when not centred."""
        article = "an" if self.background[0] in "aeiou" else "a"
        text = f"a {self.size} {self.colour} {self.shape} on {article} {self.background} background"
        return text if self.position == "centre" else f"{text}, {self.position}"

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape, self.background) in HELD_OUT


def all_scenes() -> list[Scene]:
    """Every scene of the domain (3 shapes x 8 colours x 7 backgrounds x 2 sizes x 9 positions)."""
    return [Scene(s, c, b, z, p) for s, c, b, z, p in product(SHAPES, COLOURS, COLOURS, SIZES, POSITIONS)
            if c != b]


def split(held_out: bool) -> list[Scene]:
    """Training scenes (held_out=False) or the held-out ones."""
    return [s for s in all_scenes() if s.held_out == held_out]


def centre_xy(size: str, position: str) -> tuple[int, int]:
    """Pixel centre of the shape's box: a margin of 2 px from the edges in the named direction."""
    half = SIZES[size] // 2
    lo, mid, hi = 2 + half, SIZE // 2, SIZE - 2 - half
    x = lo if "left" in position else hi if "right" in position else mid
    y = lo if "top" in position else hi if "bottom" in position else mid
    return x, y


def render(scene: Scene, scale: int = 1) -> np.ndarray:
    """uint8 [SIZE * scale, SIZE * scale, 3]: the background filled, the shape drawn with hard edges.
    scale > 1 draws the same scene at a higher resolution (the ×4 upscaler's targets); scale 1 is the
    demo model's world."""
    side = SIZE * scale
    image = Image.new("RGB", (side, side), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    x, y = centre_xy(scene.size, scene.position)
    half = SIZES[scene.size] // 2
    box = ((x - half) * scale, (y - half) * scale, (x + half) * scale - 1, (y + half) * scale - 1)
    fill = PALETTE[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # upright triangle: apex at the top centre, base along the bottom of the box
        draw.polygon([(x * scale - 0.5, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return np.asarray(image)


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """uint8 [H / factor, W / factor, 3]: bicubic (pillow's, antialiased), e.g. a 4x render down to the
    demo's size: the ×4 upscaler's low-resolution input in training and evaluation."""
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w // factor, h // factor), Image.BICUBIC))
