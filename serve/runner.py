"""One engine call for a batch of jobs that share size, steps, guidance, clip skip, task, sampler and
LoRA set, each sample keeping its own prompt, negative prompt and seed: a GenerateRequest with
per-sample lists, run by Pipeline.run with a per-step hook.

Sample k is drawn from ε_k = N(0, I) seeded by its own seed (sdrt.engine.request.noise), so an
image is the image `sdrt generate --seed S` draws alone, whichever batch it ran in."""
from __future__ import annotations

from dataclasses import dataclass

from sdrt.engine.pipeline import Result
from sdrt.engine.request import GenerateRequest


@dataclass
class Sample:
    """One image to draw."""
    prompt: str
    negative: str
    seed: int


def request(samples: list[Sample], steps: int, guidance: float, height: int | None, width: int | None,
            clip_skip: int = 1, image=None, mask=None, strength=None, sampler: str = "DDIM",
            schedule: str | None = None, noise_level: int | None = None) -> GenerateRequest:
    """image/mask: a PIL image each (image to image, inpainting; an upscaler's low-resolution image
    with its noise level), shared by every sample; the output then has the image's size (an
    upscaler: 4x). LoRAs stay as applied (the worker switches them)."""
    return GenerateRequest(prompt=[s.prompt for s in samples], negative=[s.negative for s in samples],
                           steps=steps, guidance=guidance, height=None if image is not None else height,
                           width=None if image is not None else width, batch=len(samples),
                           seed=[s.seed for s in samples], image=image, mask=mask, strength=strength,
                           clip_skip=clip_skip, sampler=sampler, schedule=schedule, noise_level=noise_level)


def run(pipe, samples: list[Sample], steps: int, guidance: float, height: int | None, width: int | None,
        clip_skip: int = 1, image=None, mask=None, strength=None, sampler: str = "DDIM",
        schedule: str | None = None, on_step=None, noise_level: int | None = None) -> Result:
    """on_step(step, steps) after each denoising step, counted over all `steps` (image inputs
    start part-way: strength); it may raise sdrt.engine.request.Cancelled to stop the call."""
    def hook(done: int, total: int) -> None:
        on_step(steps - total + done, steps)
    return pipe.run(request(samples, steps, guidance, height, width, clip_skip, image, mask, strength,
                                    sampler, schedule, noise_level),
                    on_step=hook if on_step is not None else None)
