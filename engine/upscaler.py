"""The x4 upscaler's inputs, as diffusers' StableDiffusionUpscalePipeline prepares them. numpy only.

    image     RGB in [-1, 1] at its own size (a multiple of the VAE factor, 4; with resize rounded
              down and resized bicubic, as the pipeline's image processor does)
    ε_img     N(0, I) of the image's shape: from the seed (its own stream, so the latents stay those
              of the seed), or given (--image-noise), [1 | B, 3, h, w]
    image_s   sqrt(ᾱ_s) image + sqrt(1 - ᾱ_s) ε_img      the low-res DDPM scheduler's add_noise at
                                                          s = the noise level (0..max_noise_level)
    x_T       init_noise_sigma ε, ε of shape [B, 4, h, w]: the latents are the low-res image's size
    step      u = concat(scale_model_input(x_t), image_s), class labels = s (CFG: both halves)
    output    vae_decoder(x_0): [B, 3, 4h, 4w]

The export records the max noise level and the low-res scheduler's config in the manifest
("upscaler": sdrt.export.upscaler); the step graph's extra inputs are low_res_image ([B, 3, h, w],
the noised image, repeated over the batch) and class_labels ([text_batch] int32), bound once per call.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt.engine import image_input, scheduler
from sdrt.engine.request import RequestError, resolve_seed

DEFAULT_NOISE_LEVEL = 20              # StableDiffusionUpscalePipeline.__call__'s default
RESAMPLE = "BICUBIC"                  # its VaeImageProcessor's resample filter
IMAGE_NOISE_STREAM = 1                # the image noise's generator: (seed, this), the latents' is seed


@dataclass
class LowRes:
    """One call's low-resolution input, prepared."""
    image: np.ndarray                 # [B, 3, h, w] float32: noised, repeated over the batch
    level: int                        # the noise level (the UNet's class label)
    height: int                       # output size: 4x the image's (the VAE factor)
    width: int

    def class_labels(self, rows: int) -> np.ndarray:
        return np.full((rows,), self.level, np.int32)


class Upscaler:
    """What the runtime knows of an upscaler export: the max noise level and the low-res
    scheduler's ᾱ (the forward process that noises the image)."""

    def __init__(self, record: dict):
        self.max_noise_level = int(record["max_noise_level"])
        self.alphas_cumprod = scheduler.alphas_cumprod(
            scheduler.DDIMConfig.from_json(record["low_res_scheduler"])).astype(np.float32)

    def noise_level(self, level) -> int:
        level = DEFAULT_NOISE_LEVEL if level is None else level
        if not isinstance(level, (int, np.integer)) or isinstance(level, bool) \
                or not 0 <= level <= self.max_noise_level:
            raise RequestError("noise_level", f"{{noise_level}} {level!r} must be an integer in "
                                              f"0..{self.max_noise_level} (this upscaler's max_noise_level)")
        return int(level)

    def prepare(self, request, vae_factor: int, batch: int, seed) -> LowRes:
        """The noised low-resolution image of a request, and the output size. RequestError for
        what an upscaler cannot take (no image, a mask, strength, a size other than 4x)."""
        r = request
        if r.image is None:
            raise RequestError("image", "this export is an upscaler: give {image} (the low-resolution image "
                                        "to upscale)")
        if r.mask is not None:
            raise RequestError("mask", "{mask} is for inpainting: an upscaler takes {image} alone")
        if r.strength is not None:
            raise RequestError("strength", "{strength} is for image to image: an upscaler runs every step "
                                           "(its {noise_level} sets how much noise the image gets)")
        level = self.noise_level(r.noise_level)
        pil = image_input.load(r.image, "image")
        h, w = image_input.target_size(pil, vae_factor, r.resize)
        image = image_input.image_array(pil, h, w, RESAMPLE)              # [1, 3, h, w] in [-1, 1]
        out_h, out_w = h * vae_factor, w * vae_factor
        for what, asked, got in (("height", r.height, out_h), ("width", r.width, out_w)):
            if asked is not None and asked != got:
                raise RequestError(what, f"{{{what}}} {asked}: an upscaler's output is {vae_factor}x the image "
                                         f"({out_w}x{out_h}); leave {{height}}/{{width}} out")
        noise = self.image_noise(r.image_noise, image.shape, batch, seed, r)
        return LowRes(np.ascontiguousarray(np.broadcast_to(self.add_noise(image, noise, level),
                                                           (batch,) + image.shape[1:])), level, out_h, out_w)

    def add_noise(self, image: np.ndarray, noise: np.ndarray, level: int) -> np.ndarray:
        """DDPMScheduler.add_noise at timestep `level` (float32, as diffusers computes it):
        sqrt(ᾱ) x + sqrt(1 - ᾱ) ε."""
        a = self.alphas_cumprod[level]
        return (np.sqrt(a) * image + np.sqrt(np.float32(1) - a) * noise).astype(np.float32)

    @staticmethod
    def image_noise(given, shape: tuple, batch: int, seed, r) -> np.ndarray:
        """ε_img: [1, 3, h, w] (one noise for the batch, as diffusers) or [B, 3, h, w]; given, or
        from the seed (a list of seeds: one per sample, each as a batch of one with that seed)."""
        if given is not None:
            noise = np.asarray(given)
            if noise.ndim != 4 or noise.shape[0] not in (1, batch) or noise.shape[1:] != shape[1:]:
                raise RequestError("image_noise", f"{{image_noise}} has shape {list(noise.shape)}, expected "
                                                  f"{[1, *shape[1:]]} (or {[batch, *shape[1:]]}): the low-resolution "
                                                  f"image's shape")
            if not np.issubdtype(noise.dtype, np.floating) or not np.all(np.isfinite(noise)):
                raise RequestError("image_noise", "{image_noise} must be finite floating-point values")
            return noise.astype(np.float32)
        if seed is None:                      # latents given and no seed: a random one
            seed = [resolve_seed(s) for s in r.seed] if isinstance(r.seed, list) else resolve_seed(r.seed)
        if isinstance(seed, list):
            return np.concatenate([_seeded(shape, s) for s in seed])
        return _seeded(shape, seed)


def _seeded(shape: tuple, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, IMAGE_NOISE_STREAM]).standard_normal(shape, dtype=np.float32)
