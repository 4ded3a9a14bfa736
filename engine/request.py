"""One generation's request: everything a call asks for, checked once.

    GenerateRequest(prompt, negative, steps, guidance, height, width, batch, seed | latents,
                    image, mask, strength, resize, clip_skip, embeddings, loras, vae_batch,
                    prompt_syntax, sampler, schedule, noise, cfg_cutoff, control,
                    control_preprocess, noise_level, image_noise)

The CLI (`sdrt generate`), the Python API (`Pipeline.generate(**kwargs)`) and a server build one
and hand it to `Pipeline.run(request, on_step=...)`. Checks that need no model run when the
request is made (`__post_init__`); checks against a model (size vs the VAE factor, clip skip vs
the text encoder's layers, prompt length vs built engines, image inputs vs an inpainting UNet)
run once in the Pipeline (clip skip's type too: its message gives the model's range). Every failure is a RequestError naming the field; the CLI writes the
field as its flag (clip_skip -> --clip-skip), a server as the JSON key.

Also here: "FILE[:X]" specs (LoRA "FILE[:SCALE]", embedding "FILE[:TOKEN]", control image
"IMAGE[:SCALE[:START:END]]") parsed by one rule,
and the seeds: -1 (the web UI's "random seed") or None picks a random seed that is reported.
"""
from __future__ import annotations

import dataclasses
import math
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sdrt.errors import UserError

PROMPT_SYNTAXES = ("webui", "plain")   # webui: (emphasis:1.2), [less], BREAK; plain: text read literally
RANDOM_SEED = -1                       # the web UI's "random seed"
SEED_LIMIT = 2 ** 32                   # random seeds are drawn below this (the web UI's range)


class RequestError(UserError):
    """A request option that is wrong. `field` is GenerateRequest's field name; the message
    template writes options as {field} so that each face names them its own way:
    str(e) says "clip skip", the CLI's `render(flag_of)` "--clip-skip", a server's `render(str)` "clip_skip"."""

    def __init__(self, field: str, template: str):
        self.field, self.template = field, template
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] | None = None) -> str:
        """The message with each {field} written as name(field) (default: the field in words)."""
        name = name or (lambda field: field.replace("_", " "))
        fields = {f.name for f in dataclasses.fields(GenerateRequest)}   # other braces are text
        return re.sub(r"\{(\w+)\}", lambda m: name(m[1]) if m[1] in fields else m[0], self.template)


@dataclass(frozen=True)
class Control:
    """One ControlNet's input for a call: its conditioning image (path, PIL image or uint8 array),
    conditioning scale, and step window (diffusers' control_guidance_start/end: the ControlNet acts
    on the steps whose share of the run lies in [start, end])."""
    image: object
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def keep(self, i: int, n: int) -> float:
        """1 when step i of n lies in the window, else 0 (diffusers' controlnet_keep)."""
        return 1.0 - float(i / n < self.start or (i + 1) / n > self.end)


CONTROL_SCALE_MAX = 10.0     # conditioning scales are 0..this (diffusers' are usually 0..2)


class Cancelled(Exception):
    """Raised by an on_step callback to stop a generation between steps (not a user error)."""


# on_step(step_done, steps_total): called after each denoising step is launched
StepCallback = Callable[[int, int], None]


@dataclass
class GenerateRequest:
    prompt: str | list[str]                 # one prompt for the batch, or one per sample
    negative: str | list[str] = ""          # the same forms as prompt
    steps: int = 50
    guidance: float = 7.5                   # > 1: classifier-free guidance
    height: int | None = None               # None: the model's default (with an image: its size)
    width: int | None = None
    batch: int | None = None                # None: len(prompt) for a list, else 1
    seed: int | list[int] | None = None     # one seed for the batch, or one per sample; -1/None: random
    latents: np.ndarray | None = None       # the initial noise ε [B, C, H/f, W/f] instead of a seed
    image: object = None                    # path, PIL image or uint8 array: image to image / inpainting
    mask: object = None                     # with image: inpainting, white = repaint
    strength: float | None = None           # default 0.75 (image to image), 1.0 (inpainting)
    resize: bool = False                    # an image whose size is not a multiple of the VAE factor
    clip_skip: int = 1                      # 1 = the text encoder's last layer, 2 = the one before, ...
    embeddings: list | None = None          # "FILE[:TOKEN]" or (FILE, TOKEN); None: the pipeline's
    loras: list | None = None               # "FILE[:SCALE]" or (FILE, SCALE); None: the pipeline's current
    vae_batch: int | None = None            # decode in slices of this many images
    prompt_syntax: str = "webui"            # see PROMPT_SYNTAXES
    sampler: str = "DDIM"                   # sdrt.engine.samplers.SAMPLER_NAMES, case-insensitive
    schedule: str | None = None             # uniform | trailing | karras; None: the sampler's name / config
    noise: np.ndarray | None = None         # the per-step noise z [steps, B, C, H/f, W/f] instead of a seed's
    cfg_cutoff: float | None = None         # after this fraction of the steps run: no guidance
    control: list | None = None             # per ControlNet, in export order: "IMAGE[:SCALE[:START:END]]",
                                            # (IMAGE, SCALE[, START, END]), an image, or a Control
    control_preprocess: str | None = None   # "canny[:LOW:HIGH]": edge maps made from the control images
    noise_level: int | None = None          # x4 upscaler: the low-res image's noise level (default 20)
    image_noise: np.ndarray | None = None   # x4 upscaler: that noise [1 | B, 3, h, w] instead of a seed's

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Every check that needs no model; RequestError naming the field."""
        self.batch = self._batch()
        self.prompt = self._prompts("prompt", self.prompt)
        self.negative = self._prompts("negative", self.negative)
        positive_int("steps", self.steps)
        if not is_number(self.guidance):
            raise RequestError("guidance", f"{{guidance}} {self.guidance!r} must be a finite number")
        for name in ("height", "width"):       # their range is the model's: checked by the Pipeline
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool)):
                raise RequestError(name, f"{{{name}}} must be an integer, got {v!r}")
        if self.vae_batch is not None:
            positive_int("vae_batch", self.vae_batch)
        self.seed = self._seeds()
        if self.latents is not None:
            self.latents = np.asarray(self.latents)
        if self.image is None:
            if self.mask is not None:
                raise RequestError("mask", "{mask} needs {image}: inpainting repaints the white part "
                                           "of the mask in the image")
            if self.strength is not None:
                raise RequestError("strength", "{strength} needs {image} (image to image or inpainting)")
        if self.strength is not None and (not is_number(self.strength) or not 0 < self.strength <= 1):
            raise RequestError("strength", f"{{strength}} {self.strength!r} must be in (0, 1]: "
                                           f"the share of the steps that are run")
        self.embeddings = None if self.embeddings is None else [self._spec("embeddings", s, str, None)
                                                                for s in self.embeddings]
        self.loras = None if self.loras is None else [self._spec("loras", s, float, 1.0) for s in self.loras]
        if self.prompt_syntax not in PROMPT_SYNTAXES:
            raise RequestError("prompt_syntax", f"{{prompt_syntax}} {self.prompt_syntax!r} is not one of "
                                                f"{', '.join(PROMPT_SYNTAXES)}")
        self.control = None if self.control is None else [self._control(c) for c in self.control]
        self.control_preprocess = self._preprocess()
        from sdrt.engine import samplers        # (samplers -> scheduler -> this module's RequestError)
        self.sampler = self._sampler()
        try:
            self.cfg_cutoff = samplers.check_cfg_cutoff(self.cfg_cutoff)
        except UserError as e:
            raise RequestError("cfg_cutoff", str(e).replace("cfg cutoff", "{cfg_cutoff}", 1)) from None
        if self.noise is not None:
            self.noise = np.asarray(self.noise)
        if self.image is None and (self.noise_level is not None or self.image_noise is not None):
            field = "noise_level" if self.noise_level is not None else "image_noise"
            raise RequestError(field, f"{{{field}}} needs {{image}}: it is the upscaler's low-resolution "
                                      f"image's noise")

    def _sampler(self):
        """The sampler and schedule (sdrt.engine.samplers.Sampler); RequestError naming the field."""
        from sdrt.engine import samplers
        if isinstance(self.sampler, samplers.Sampler):
            return self.sampler
        try:
            return samplers.Sampler.parse(self.sampler, self.schedule)
        except UserError as e:                  # its first word of the two names the field
            msg = str(e).replace("{", "(").replace("}", ")")
            field = min(("sampler", "schedule"), key=lambda f: msg.find(f) if f in msg else len(msg))
            raise RequestError(field, msg.replace(field, "{" + field + "}", 1)) from None

    def _batch(self) -> int:
        lists = [(n, len(v)) for n, v in (("prompt", self.prompt), ("negative", self.negative),
                                          ("seed", self.seed)) if isinstance(v, (list, tuple))]
        batch = self.batch if self.batch is not None else (lists[0][1] if lists else 1)
        positive_int("batch", batch)
        for name, n in lists:
            if n != batch:
                raise RequestError(name, f"{{{name}}} has {n} entries for a batch of {batch}: "
                                         f"give one per sample, or one for all")
        return batch

    def _prompts(self, name: str, value):
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(p, str) for p in items):
            raise RequestError(name, f"{{{name}}} must be a string or a list of strings")
        return list(value) if isinstance(value, (list, tuple)) else value

    def _seeds(self):
        seeds = list(self.seed) if isinstance(self.seed, (list, tuple)) else [self.seed]
        for s in seeds:
            if s is None:
                continue
            if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < RANDOM_SEED:
                raise RequestError("seed", f"{{seed}} {s!r} must be an integer >= 0, or -1 for a random seed")
        return seeds if isinstance(self.seed, (list, tuple)) else self.seed

    def _control(self, c) -> Control:
        if not isinstance(c, Control):
            if isinstance(c, (str, Path)):
                c = self._spec("control", c, float, None, counts=(1, 3))
            elif not isinstance(c, (tuple, list)):
                c = (c, None)                           # an image object alone
            if len(c) not in (2, 4):
                raise RequestError("control", f"{{control}} entry {c!r}: give IMAGE[:SCALE[:START:END]] or "
                                              f"(IMAGE, SCALE[, START, END])")
            image, rest = c[0], c[1:]
            rest = rest[0] if len(rest) == 1 and isinstance(rest[0], tuple) else rest
            rest = (1.0,) if rest in ((None,), ()) else tuple(rest)
            c = Control(image, *rest)
        if not is_number(c.scale) or not 0 <= c.scale <= CONTROL_SCALE_MAX:
            raise RequestError("control", f"{{control}} scale {c.scale!r} must be in [0, {CONTROL_SCALE_MAX:g}] "
                                          f"(1 = as trained)")
        if not (is_number(c.start) and is_number(c.end) and 0 <= c.start < c.end <= 1):
            raise RequestError("control", f"{{control}} step window {c.start!r}:{c.end!r} must satisfy "
                                          f"0 <= START < END <= 1 (shares of the steps)")
        return Control(c.image, float(c.scale), float(c.start), float(c.end))

    def _preprocess(self):
        """None, or ("canny", (low, high)) from "canny[:LOW:HIGH]"."""
        p = self.control_preprocess
        if p is None or isinstance(p, tuple):
            return p
        if self.control is None:
            raise RequestError("control_preprocess", "{control_preprocess} needs {control} images to preprocess")
        name, x = self._spec("control_preprocess", p, float, None, counts=(2,))
        if name != "canny" or (x is not None and not isinstance(x, tuple)):
            raise RequestError("control_preprocess", f"{{control_preprocess}} {p!r}: give canny or canny:LOW:HIGH "
                                                     f"(OpenCV's Canny thresholds, e.g. canny:100:200)")
        low, high = x or (100.0, 200.0)
        if not (is_number(low) and is_number(high) and 0 <= low <= high <= 1000):
            raise RequestError("control_preprocess", f"{{control_preprocess}} thresholds {low:g}:{high:g} must "
                                                     f"satisfy 0 <= LOW <= HIGH <= 1000")
        return ("canny", (low, high))

    def _spec(self, name: str, spec, convert, default, counts=(1,)):
        try:
            return parse_spec(spec, convert, default, counts)
        except (TypeError, ValueError) as e:
            raise RequestError(name, f"{{{name}}} entry {spec!r}: {e}") from None

    # ---- what the pipeline reads ------------------------------------------------------------------

    def rows(self) -> list[str]:
        """The text encoder's prompt rows: negatives first (CFG), one per sample."""
        per_sample = lambda v: list(v) if isinstance(v, list) else [v] * self.batch
        if self.guidance > 1.0:
            return per_sample(self.negative) + per_sample(self.prompt)
        return per_sample(self.prompt)

    def used_seed(self):
        """The seed(s) with -1/None drawn at random (what the noise is made from); None with latents."""
        if self.latents is not None:
            return None
        if isinstance(self.seed, list):
            return [resolve_seed(s) for s in self.seed]
        return resolve_seed(self.seed)


def noise(shape: tuple, seed) -> np.ndarray:
    """ε ~ N(0, I) float32: one generator for the batch (an int seed, as always), or one per sample
    (a list of seeds; sample i is then the same as a batch of one with seed i)."""
    if isinstance(seed, list):
        return np.stack([np.random.default_rng(s).standard_normal(shape[1:], dtype=np.float32) for s in seed])
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def resolve_seed(seed: int | None) -> int:
    """-1 or None: a random seed in [0, 2^32); else the seed (checked: an integer >= 0)."""
    if seed is None or seed == RANDOM_SEED:
        return secrets.randbelow(SEED_LIMIT)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise RequestError("seed", f"{{seed}} {seed!r} must be an integer >= 0, or -1 for a random seed")
    return int(seed)


def positive_int(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise RequestError(name, f"{{{name}}} must be a positive integer, got {value!r}")


def is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def parse_spec(spec, convert=str, default=None, counts=(1,)) -> tuple[str, object]:
    """"FILE[:X]" or a (FILE, X) pair -> (FILE, X); X converted by `convert`, `default` when absent.
    The LoRA form is FILE[:SCALE] (convert=float, default 1.0), the embedding form FILE[:TOKEN].
    counts: how many colon-separated X a spec may carry; with more than one (the control image's
    IMAGE[:SCALE[:START:END]]: counts=(1, 3)), X is a tuple of that many values when there are
    more than one, the longest form that parses winning.

    The last colon separates X unless it belongs to the path: no text before it, the whole spec
    names an existing file (a file named a:b), what follows holds a path separator (C:\\dir\\f), or
    what follows is not an X (odd:name.safetensors for a scale)."""
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise ValueError("give FILE[:X] or a (FILE, X) pair")
        path, x = spec
        return str(path), default if x is None else x
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"expected a path string, got {type(spec).__name__}")
    spec = str(spec)
    for n in sorted((c for c in counts if c > 1), reverse=True):
        head, *tails = spec.rsplit(":", n)
        if len(tails) == n and head and not Path(spec).exists() and all(t and "/" not in t and "\\" not in t
                                                                         for t in tails):
            try:
                return head, tuple(convert(t) for t in tails)
            except ValueError:
                pass
    path, sep, tail = spec.rpartition(":")
    if not sep or not path or "/" in tail or "\\" in tail or Path(spec).exists():
        return spec, default
    if not tail:
        return path, default
    try:
        return path, convert(tail)
    except ValueError:
        return spec, default
