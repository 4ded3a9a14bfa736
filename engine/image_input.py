"""Image and mask inputs of image-to-image and inpainting, prepared as diffusers' VaeImageProcessor
prepares them for StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline. PIL and numpy
only (the runtime imports no torch).

    image          RGB (RGBA / greyscale / palette converted), [0, 255] -> x / 255 * 2 - 1 in [-1, 1]
    mask           resized like the image, then greyscale, x / 255, binarised: 1 where >= 0.5
                   (white = repaint), 0 elsewhere
    masked image   image * (mask < 0.5): the region to repaint becomes 0 (mid grey)
    latent mask    the mask at latent size, nearest neighbour (torch's interpolate default)

A size that is not a multiple of the VAE factor is refused, or with resize=True rounded down to one
and resized with Lanczos, as the image processor does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.engine.request import RequestError
from sdrt.errors import UserError

RESAMPLE = "LANCZOS"  # VaeImageProcessor's default resample filter


@dataclass
class Source:
    """One image (and mask) for a call, repeated over the batch by the pipeline."""
    image: np.ndarray                  # [1, 3, H, W] float32 in [-1, 1]
    mask: np.ndarray | None            # [1, 1, H, W] float32, 1 = repaint
    height: int
    width: int

    @property
    def masked_image(self) -> np.ndarray:
        """image * (mask < 0.5), as diffusers' inpainting pipeline computes it."""
        return self.image * (self.mask < 0.5)

    def latent_mask(self, vae_factor: int) -> np.ndarray:
        """[1, 1, H/f, W/f]: torch.nn.functional.interpolate(mask, size) in its default "nearest"
        mode picks source index floor(i * in / out)."""
        h, w = self.height // vae_factor, self.width // vae_factor
        rows = _nearest(self.height, h)
        cols = _nearest(self.width, w)
        return np.ascontiguousarray(self.mask[:, :, rows][:, :, :, cols])


def _nearest(n_in: int, n_out: int) -> np.ndarray:
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def prepare(image, mask, vae_factor: int, resize: bool = False) -> Source:
    """The Source for an image (path, PIL image or uint8 array) and an optional mask."""
    pil = load(image, "image")
    h, w = target_size(pil, vae_factor, resize)
    m = None
    if mask is not None:
        mask_pil = load(mask, "mask")
        if mask_pil.size != pil.size:
            raise UserError(f"the mask is {_size(mask_pil)} but the image is {_size(pil)}: "
                            f"give a mask of the image's size")
        m = mask_array(mask_pil, h, w)
    return Source(image_array(pil, h, w), m, h, w)


def load(source, what: str):
    """A PIL image from a path, a PIL image or a uint8 array ([H, W], [H, W, 1|3|4]); bool arrays
    (masks) are taken as 0 / 255."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source, what)
    path = Path(source)
    try:
        with Image.open(path) as img:
            img.load()                         # decode now: a truncated file fails here
            return img.copy()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read {what} {path}: {why}") from None


def _from_array(a: np.ndarray, what: str):
    from PIL import Image
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise UserError(f"{what} array of shape {list(a.shape)} and dtype {a.dtype}: give uint8 [H, W], "
                        f"[H, W, 3] or [H, W, 4] (0-255), or a PIL image")
    return Image.fromarray(np.ascontiguousarray(a))


def _size(img) -> str:
    return f"{img.width}x{img.height}"


def target_size(img, vae_factor: int, resize: bool) -> tuple[int, int]:
    """(height, width): the image's own, or rounded down to the VAE factor with resize=True
    (VaeImageProcessor.get_default_height_width)."""
    w, h = img.size
    rw, rh = w - w % vae_factor, h - h % vae_factor
    if (rw, rh) == (w, h):
        return h, w
    if rw == 0 or rh == 0:
        raise UserError(f"the image is {_size(img)}: it must be at least {vae_factor}x{vae_factor} pixels")
    if not resize:
        raise RequestError("image", f"the image is {_size(img)} (width x height), not a multiple of {vae_factor} "
                                    f"(this model's VAE factor): pass {{resize}} to resize it to {rw}x{rh}, or crop it")
    return rh, rw


def _resized(img, h: int, w: int, resample: str = RESAMPLE):
    from PIL import Image
    if img.size == (w, h):
        return img
    return img.resize((w, h), resample=getattr(Image.Resampling, resample))


def image_array(img, h: int, w: int, resample: str = RESAMPLE) -> np.ndarray:
    """[1, 3, H, W] float32 in [-1, 1] (pil_to_numpy then normalize); resized with `resample`
    (the upscaler's image processor: BICUBIC)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    x = np.asarray(_resized(img, h, w, resample)).astype(np.float32) / 255.0
    return np.ascontiguousarray((2.0 * x - 1.0).transpose(2, 0, 1)[None])


def mask_array(img, h: int, w: int) -> np.ndarray:
    """[1, 1, H, W] float32 of 0 / 1: resized in its own mode, then greyscale, then binarised."""
    m = np.asarray(_resized(img, h, w).convert("L")).astype(np.float32) / 255.0
    m = np.where(m < 0.5, np.float32(0), np.float32(1))
    return np.ascontiguousarray(m[None, None])


def control_array(img, h: int, w: int) -> np.ndarray:
    """A ControlNet's conditioning image: [1, 3, H, W] float32 in [0, 1] (diffusers' control image
    processor: RGB, resized to the output size, pil_to_numpy, no normalisation)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    x = np.asarray(_resized(img, h, w)).astype(np.float32) / 255.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


CANNY = (100.0, 200.0)       # the ControlNet authors' default thresholds (annotator/canny)


def canny(img, low: float = CANNY[0], high: float = CANNY[1]):
    """The edge map of an image as the ControlNet authors' canny annotator makes it: OpenCV's Canny
    on the RGB uint8 image, white edges on black, as an RGB image (the optional opencv extra)."""
    try:
        import cv2
    except ImportError:
        raise UserError("--control-preprocess canny needs OpenCV: pip install 'sdrt[canny]' "
                        "(opencv-python-headless)") from None
    from PIL import Image
    edges = cv2.Canny(np.asarray(img.convert("RGB")), low, high)
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=2))


def default_size(img, vae_factor: int) -> tuple[int, int]:
    """(height, width) of an output sized by a control image: its own, rounded down to the VAE
    factor (VaeImageProcessor.get_default_height_width)."""
    w, h = img.size
    if w < vae_factor or h < vae_factor:
        raise UserError(f"the control image is {_size(img)}: it must be at least {vae_factor}x{vae_factor} pixels")
    return h - h % vae_factor, w - w % vae_factor
