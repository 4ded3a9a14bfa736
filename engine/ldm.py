"""What the latent-diffusion members without a text encoder ask of a call (sdrt.export.ldm):

    unconditional (LDMPipeline)     no prompt; x_T ~ N(0, I) at the latent size, no guidance
    super-resolution (LDM-SR)       the low-resolution image y in [-1, 1] at the latent size, bound
                                    once per call (the step concatenates it to x_t); the output is
                                    the latent size x the VQ factor
    class-conditional               class_labels [text_batch] int32, bound once per call:
                                    CFG rows [null class] * B + [class] * B (a text
                                    model without a null class: [class] * 2B), else [class] * B

The low-resolution image is taken at its own size when its sides are multiples of the UNet's
downsampling; with resize, rounded down to multiples of 32 with Lanczos, as diffusers' LDM-SR
preprocess does.
"""
from __future__ import annotations

import numpy as np

from sdrt.engine.request import RequestError

SR_RESIZE_MULTIPLE = 32      # diffusers' LDMSuperResolutionPipeline preprocess: w, h - w, h % 32


def check_prompts(config, work_dir, prompt, negative) -> None:
    """A prompt only where a text encoder reads it; a text model needs one."""
    if config.has_text:
        if prompt is None:
            raise RequestError("prompt", f"{work_dir} is a text-to-image model: give a {{prompt}}")
        return
    for name, value in (("prompt", prompt), ("negative", negative)):
        if any(p for p in (value if isinstance(value, list) else [value]) if p):
            raise RequestError(name, f"{work_dir} has no text encoder (an unconditional, class-conditional or "
                                     f"super-resolution model): leave out {{{name}}}")


def class_labels(config, work_dir, label, batch: int, guided: bool) -> np.ndarray | None:
    """[text_batch] int32 for the step's class_labels input, or None for a UNet without classes (and
    for the x4 upscaler, whose class labels are its noise level: sdrt.engine.upscaler)."""
    if config.upscaler:
        if label is not None:
            raise RequestError("class_label", f"{work_dir} is an upscaler: its class labels are the noise level; "
                                              f"leave out {{class_label}} and set {{noise_level}}")
        return None
    if not config.class_embeds:
        if label is not None:
            raise RequestError("class_label", f"{work_dir} has no class embedding (num_class_embeds): "
                                              f"leave out {{class_label}}")
        return None
    if label is None:
        raise RequestError("class_label", f"{work_dir} is class-conditional: give {{class_label}} "
                                          f"0..{config.classes - 1}")
    labels = label if isinstance(label, list) else [label] * batch
    for c in labels:
        if not 0 <= c < config.classes:
            null = f" (row {config.classes} is the null class)" if config.null_class else ""
            raise RequestError("class_label", f"{{class_label}} {c} is out of range: this model has classes "
                                              f"0..{config.classes - 1}{null}")
    if not guided:
        return np.array(labels, np.int32)
    uncond = [config.class_embeds - 1] * batch if config.null_class else list(labels)   # text models: the class
    return np.array(uncond + list(labels), np.int32)


def low_res_image(config, image, resize: bool):
    """(y [1, 3, h, w] in [-1, 1], h, w) of a super-resolution call; RequestError naming image."""
    from sdrt.engine import image_input
    if image is None:
        raise RequestError("image", "this is a super-resolution model: give {image}, the low-resolution image")
    pil = image_input.load(image, "image")
    m = config.latent_multiple
    w, h = pil.size
    if resize and (w % SR_RESIZE_MULTIPLE or h % SR_RESIZE_MULTIPLE):
        h, w = image_input.target_size(pil, SR_RESIZE_MULTIPLE, True)
    elif w % m or h % m:
        raise RequestError("image", f"the image is {w}x{h} (width x height): its sides must be multiples of {m} "
                                    f"(the UNet's downsampling): pass {{resize}} to resize it to multiples of "
                                    f"{SR_RESIZE_MULTIPLE} as diffusers does, or crop it")
    if h % m or w % m:
        raise RequestError("image", f"the image resized to {w}x{h} is not a multiple of {m}: crop it to one")
    return image_input.image_array(pil, h, w), h, w
