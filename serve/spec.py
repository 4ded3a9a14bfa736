"""What the server runs: a validated Spec per request, the server's Limits, and the one error type
of the HTTP side (ApiError: status, the field at fault, one line)."""
from __future__ import annotations

import base64
import binascii
import io
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.engine.request import RequestError
from sdrt.engine.samplers import SAMPLER_NAMES, SCHEDULES, Sampler
from sdrt.engine.scheduler import start_index
from sdrt.errors import UserError, first_line

AUTOMATIC = ("", "automatic")   # the web UI's scheduler "automatic": the sampler's own schedule
MAX_SEED = 2**53 - 1            # seeds stay exact in JavaScript clients
TASKS = ("txt2img", "img2img", "inpaint")
UPSCALE = "upscale"             # the task of an x4 upscaler export (POST /v1/jobs with image and noise_level)


class ApiError(Exception):
    """A request the server refuses: HTTP status, the field at fault (or None), one line."""

    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.field, self.kind = status, message, field, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.field, "code": self.status},
                "detail": self.message}


def bad(field: str, message: str, status: int = 400) -> ApiError:
    return ApiError(status, f"{field}: {message}", field)


@dataclass(frozen=True)
class Limits:
    """What this server accepts, from the export and the command line (GET /v1/info)."""
    model: str
    default_width: int
    default_height: int
    multiple: int                    # the VAE factor
    min_size: int
    max_size: int
    max_pixels: int                  # width * height of an output image
    max_batch: int                   # images per request, and per engine call
    max_steps: int
    clip_skip_max: int
    loras: dict                      # name -> path, from --lora-dir
    embeddings: tuple                # tokens, from --embedding-dir
    max_image_pixels: int = 4096 * 4096   # an uploaded image (decompression bombs are refused)
    max_body_bytes: int = 32 << 20
    inpainting_unet: bool = False
    max_noise_level: int | None = None    # an x4 upscaler export: noise levels 0..this; None: not one

    @property
    def upscaler(self) -> bool:
        return self.max_noise_level is not None

    def info(self) -> dict:
        return {"model": self.model, "default_width": self.default_width, "default_height": self.default_height,
                "size": {"min": self.min_size, "max": self.max_size, "multiple": self.multiple,
                         "max_pixels": self.max_pixels},
                "max_batch": self.max_batch, "steps": {"min": 1, "max": self.max_steps},
                "clip_skip": {"min": 1, "max": self.clip_skip_max},
                "samplers": list(SAMPLER_NAMES), "schedules": list(SCHEDULES), "loras": sorted(self.loras), "embeddings": list(self.embeddings),
                "tasks": [UPSCALE] if self.upscaler else ["inpaint"] if self.inpainting_unet else list(TASKS),
                **({"noise_level": {"min": 0, "max": self.max_noise_level, "default": DEFAULT_NOISE_LEVEL}}
                   if self.upscaler else {}),
                "defaults": dict(DEFAULTS, width=self.default_width, height=self.default_height),
                "max_image_pixels": self.max_image_pixels, "max_body_bytes": self.max_body_bytes}


DEFAULTS = {"negative_prompt": "", "steps": 25, "guidance_scale": 5.0, "n": 1, "seed": -1, "sampler": "DDIM",
            "clip_skip": 1}


@dataclass
class Spec:
    """One request, checked: what the engine worker runs."""
    prompt: str
    negative: str
    steps: int
    guidance: float
    width: int
    height: int
    n: int
    seeds: list
    sampler: str = "DDIM"
    schedule: str | None = None      # uniform | trailing | karras; None: the sampler's name / the config
    clip_skip: int = 1
    loras: tuple = ()                # ((name, scale), ...) sorted by name
    image: object = None             # PIL image (image to image, inpainting), already at width x height
    mask: object = None              # PIL "L" image, white = repaint
    strength: float | None = None
    not_applied: list = field(default_factory=list)   # accepted fields sdrt does not apply
    noise_level: int | None = None   # an x4 upscaler's (then image is the low-resolution image)

    def __post_init__(self):
        self.task = UPSCALE if self.noise_level is not None else \
            "txt2img" if self.image is None else "img2img" if self.mask is None else "inpaint"

    @property
    def method(self) -> Sampler:
        """The runtime's sampler and schedule (what the step table is built from)."""
        return Sampler.parse(self.sampler, self.schedule)

    def release_inputs(self) -> None:
        """Drop the input image and mask (a finished job keeps its status, not its inputs)."""
        self.image = self.mask = None

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one engine call. Image inputs are one per call."""
        own = id(self) if self.task != "txt2img" else None
        return (self.task, self.width, self.height, self.steps, self.guidance, self.clip_skip, self.loras,
                self.method, own)

    def step_key(self) -> tuple:
        """Requests with equal keys can share the slots of step-level batching: one shape plan
        (size, guidance on or off) and one LoRA set; steps, guidance scale, clip skip and prompts
        are per slot. Image inputs run per request."""
        own = id(self) if self.task != "txt2img" else None
        return (self.task, self.width, self.height, self.guidance > 1.0, self.loras, own)

    def info(self) -> dict:
        return {"prompt": self.prompt, "negative_prompt": self.negative, "steps": self.steps,
                "guidance_scale": self.guidance, "width": self.width, "height": self.height, "n": self.n,
                "seeds": list(self.seeds), "sampler": self.sampler,
                "schedule": self.schedule, "clip_skip": self.clip_skip,
                "loras": [{"name": n, "scale": s} for n, s in self.loras], "task": self.task,
                "strength": self.strength, "not_applied": list(self.not_applied),
                **({"noise_level": self.noise_level} if self.noise_level is not None else {})}


# ---- checks, one per field -------------------------------------------------------------------------

def integer(field: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise bad(field, f"{v!r} is not an integer")
    if not lo <= v <= hi:
        raise bad(field, f"{v} is outside {lo}..{hi}")
    return v


def number(field: str, v, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(field, f"{v!r} is not a finite number")
    if not lo <= v <= hi:
        raise bad(field, f"{v} is outside {lo}..{hi}")
    return float(v)


def text(field: str, v, limit: int = 20000) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise bad(field, "must be a string")
    if len(v) > limit:
        raise bad(field, f"{len(v)} characters, at most {limit}")
    return v


def size(lim: Limits, width, height, wfield: str = "width", hfield: str = "height") -> tuple[int, int]:
    width = integer(wfield, width, 1, 1 << 20)
    height = integer(hfield, height, 1, 1 << 20)
    for f, v in ((wfield, width), (hfield, height)):
        if v % lim.multiple:
            raise bad(f, f"{v} is not a multiple of {lim.multiple} (this model's VAE factor)")
        if not lim.min_size <= v <= lim.max_size:
            raise bad(f, f"{v} is outside this server's {lim.min_size}..{lim.max_size}")
    if width * height > lim.max_pixels:
        raise bad(wfield, f"{width}x{height} is over this server's {lim.max_pixels} pixels per image")
    return width, height


def parse_size(lim: Limits, s, field: str = "size") -> tuple[int, int] | None:
    """"WxH" -> (width, height); None or "auto": None."""
    if s is None or s == "auto":
        return None
    if not isinstance(s, str) or "x" not in s.lower():
        raise bad(field, f"{s!r} is not WIDTHxHEIGHT, e.g. {lim.default_width}x{lim.default_height}")
    w, _, h = s.lower().partition("x")
    if not (w.strip().isdigit() and h.strip().isdigit()):
        raise bad(field, f"{s!r} is not WIDTHxHEIGHT, e.g. {lim.default_width}x{lim.default_height}")
    return size(lim, int(w), int(h), field, field)


def sampler(v, schedule=None, field: str = "sampler", schedule_field: str = "schedule") -> tuple[str, str | None]:
    """(sampler name, schedule or None), checked by the runtime's parser (sdrt.engine.samplers.Sampler);
    schedule None or "automatic": the sampler's own."""
    if v is None or v == "":
        v = "DDIM"
    if not isinstance(v, str):
        raise bad(field, f"must be a string: one of {', '.join(SAMPLER_NAMES)}")
    if schedule is not None and not isinstance(schedule, str):
        raise bad(schedule_field, f"must be a string: automatic or one of {', '.join(SCHEDULES)}")
    if schedule is not None and schedule.strip().lower() in AUTOMATIC:
        schedule = None
    try:
        Sampler.parse(v, None)
    except UserError as e:
        raise bad(field, first_line(e)) from None
    try:
        Sampler.parse(v, schedule)
    except UserError as e:
        raise bad(schedule_field, first_line(e)) from None
    return v.strip(), None if schedule is None else schedule.strip().lower()


def seeds(v, n: int, field: str = "seed") -> list[int]:
    """seed, seed + 1, ... per image; None or -1: a random seed."""
    if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == -1):
        v = secrets.randbelow(2**32)
    v = integer(field, v, 0, MAX_SEED - 64)
    return [v + i for i in range(n)]


def loras(lim: Limits, items, field: str = "loras") -> tuple:
    """[{name, scale}] -> ((name, scale), ...): names from --lora-dir only, never a path."""
    if not items:
        return ()
    out = {}
    for i, item in enumerate(items):
        f = f"{field}[{i}]"
        name = item.get("name") if isinstance(item, dict) else getattr(item, "name", None)
        scale = item.get("scale", 1.0) if isinstance(item, dict) else getattr(item, "scale", 1.0)
        if not isinstance(name, str) or name not in lim.loras:
            known = ", ".join(sorted(lim.loras)) or "none (start the server with --lora-dir DIR)"
            raise bad(f + ".name", f"unknown LoRA {name!r}: this server has {known}")
        if name in out:
            raise bad(f + ".name", f"LoRA {name!r} is given twice")
        out[name] = number(f + ".scale", 1.0 if scale is None else scale, -8.0, 8.0)
    return tuple(sorted(out.items()))


def make(lim: Limits, *, prompt, negative=None, steps=None, guidance=None, width=None, height=None, n=None,
         seed=None, sampler_name=None, schedule=None, clip_skip=None, lora_list=None, image=None, mask=None, strength=None,
         not_applied=(), fields=None, noise_level=None, upscale_route: bool = False) -> Spec:
    """A Spec from the common fields; fields: {common name: the route's own name} for messages.
    upscale_route: the route takes an upscaler's image and noise_level (the native jobs API)."""
    f = {"prompt": "prompt", "negative": "negative_prompt", "steps": "steps", "guidance": "guidance_scale",
         "width": "width", "height": "height", "n": "n", "seed": "seed", "sampler": "sampler", "schedule": "schedule",
         "clip_skip": "clip_skip", "loras": "loras", "strength": "strength", **(fields or {})}
    prompt = text(f["prompt"], prompt)
    negative = text(f["negative"], negative)
    steps = integer(f["steps"], DEFAULTS["steps"] if steps is None else steps, 1, lim.max_steps)
    guidance = number(f["guidance"], DEFAULTS["guidance_scale"] if guidance is None else guidance, 0.0, 50.0)
    n = integer(f["n"], 1 if n is None else n, 1, lim.max_batch)
    noise_level = upscale_inputs(lim, image, mask, strength, noise_level, upscale_route)
    if image is not None:           # an upscaler's output is vae_factor x its image
        scale = lim.multiple if lim.upscaler else 1
        width, height = image.width * scale, image.height * scale
    width, height = size(lim, lim.default_width if width is None else width,
                         lim.default_height if height is None else height, f["width"], f["height"])
    if image is None and strength is not None:
        raise bad(f["strength"], "applies to an input image (image to image or inpainting)")
    if strength is not None:
        strength = number(f["strength"], strength, 0.0, 1.0)
        if strength == 0.0:
            raise bad(f["strength"], "must be above 0 (0 would return the input image unchanged)")
        try:
            start_index(steps, strength)
        except RequestError as e:
            raise ApiError(400, e.render(lambda name: f.get(name, name)), f["strength"]) from None
    name, schedule = sampler(sampler_name, schedule, f["sampler"], f["schedule"])
    if lim.inpainting_unet and (image is None or mask is None):
        raise ApiError(400, "this model is an inpainting UNet: it needs an image and a mask", "image")
    return Spec(prompt=prompt, negative=negative, steps=steps, guidance=guidance, width=width, height=height,
                n=n, seeds=seeds(seed, n, f["seed"]), sampler=name, schedule=schedule,
                clip_skip=integer(f["clip_skip"], 1 if clip_skip is None else clip_skip, 1, lim.clip_skip_max),
                loras=loras(lim, lora_list, f["loras"]), image=image, mask=mask, strength=strength,
                not_applied=list(not_applied), noise_level=noise_level)


DEFAULT_NOISE_LEVEL = 20        # diffusers' StableDiffusionUpscalePipeline default (sdrt.engine.upscaler)


def upscale_inputs(lim: Limits, image, mask, strength, noise_level, route: bool) -> int | None:
    """The noise level of an upscaler request (None for other models); 400s for what does not fit."""
    if not lim.upscaler:
        if noise_level is not None:
            raise bad("noise_level", "applies to an x4 upscaler model; this model is not one")
        return None
    if not route:
        raise ApiError(400, "this model is an x4 upscaler: POST /v1/jobs with image (the low-resolution image) "
                            "and noise_level", "image")
    if image is None:
        raise bad("image", "this model is an x4 upscaler: give the low-resolution image to upscale")
    if mask is not None:
        raise bad("mask", "an x4 upscaler takes no mask")
    if strength is not None:
        raise bad("strength", "an x4 upscaler runs every step: set noise_level instead")
    return integer("noise_level", DEFAULT_NOISE_LEVEL if noise_level is None else noise_level, 0, lim.max_noise_level)


# ---- images --------------------------------------------------------------------------------------

def decode_base64(field: str, s) -> bytes:
    """Base64 (standard or URL-safe, a data: URL prefix allowed) -> bytes."""
    if not isinstance(s, str) or not s:
        raise bad(field, "must be a base64-encoded image string")
    if s.startswith("data:"):
        s = s.partition(",")[2]
    s = "".join(s.split())
    try:
        if "-" in s or "_" in s:
            return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
        return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise bad(field, "is not valid base64") from None


def open_image(lim: Limits, field: str, data: bytes):
    """Bytes -> a decoded PIL image; not an image or over the pixel limit: a 400 naming the field."""
    from PIL import Image, UnidentifiedImageError
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise bad(field, f"the image is over this server's {lim.max_image_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise bad(field, "is not an image (PNG, JPEG, WebP, ...)") from None
    if img.width * img.height > lim.max_image_pixels:
        raise bad(field, f"the image is {img.width}x{img.height}, over this server's {lim.max_image_pixels} pixels")
    try:
        img.load()
    except Image.DecompressionBombError:
        raise bad(field, f"the image is over this server's {lim.max_image_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError, MemoryError) as e:
        raise bad(field, f"the image cannot be decoded ({first_line(e)})") from None
    return img


def fit(lim: Limits, img, field: str, width=None, height=None):
    """The image at (width, height) when given, else its own size rounded down to the VAE factor."""
    from PIL import Image
    if width is None and height is None:
        width, height = img.width - img.width % lim.multiple, img.height - img.height % lim.multiple
        if width == 0 or height == 0:
            raise bad(field, f"the image is {img.width}x{img.height}, smaller than {lim.multiple}x{lim.multiple}")
    else:
        width = img.width if width is None else width
        height = img.height if height is None else height
    if (width, height) != img.size:
        img = img.resize((width, height), Image.LANCZOS)
    return img


def binary_mask(img, invert: bool = False):
    """A mask image -> "L", white = repaint: the alpha channel when it has transparency (the
    transparent part is repainted, as OpenAI's edits read it), else its grey level."""
    from PIL import ImageOps
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            m = alpha.point(lambda a: 255 if a < 128 else 0)
            return ImageOps.invert(m) if invert else m
    m = img.convert("L")
    return ImageOps.invert(m) if invert else m


def alpha_mask(img):
    """The transparent part of an image as a repaint mask, or None when it is opaque."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda a: 255 if a < 128 else 0)
    return None


async def pngs_base64(images) -> list[str]:
    """PNG-encode off the event loop (a large batch takes a while)."""
    from starlette.concurrency import run_in_threadpool
    return await run_in_threadpool(lambda: [png_base64(a) for a in images])


def png_base64(image) -> str:
    """uint8 [H, W, 3] -> base64 PNG."""
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def lora_files(directory: Path | None) -> dict:
    """{name: path} of the .safetensors files in --lora-dir (name: the file's stem)."""
    if directory is None:
        return {}
    return {p.stem: p for p in sorted(Path(directory).glob("*.safetensors")) if p.is_file()}


def embedding_files(directory: Path | None) -> list:
    """[(path, token)] of the embedding files in --embedding-dir (token: the file's stem)."""
    if directory is None:
        return []
    return [(p, p.stem) for p in sorted(Path(directory).iterdir())
            if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt")]
