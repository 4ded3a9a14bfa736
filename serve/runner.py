"""One Pipeline call for a batch of jobs that share size, steps, guidance, clip skip, task and
LoRA set, each job keeping its own prompt, negative prompt and seeds.

    rows    = [negative_j] * n_j ... + [prompt_j] * n_j ...   (CFG: unconditional rows first)
    ε_k     = N(0, I) from seed_k, one image at a time: image k of a job is the image
              `sdrt generate --seed seed_k` draws alone, whichever batch it ran in
    for i in range(start, steps): step graph; on_step(i + 1, steps)   (may raise to stop)
    image   = vae_decoder(x_0)

The runtime's generate takes one prompt and one seed per call and has no per-step hook, so this
module drives the Pipeline's stages itself (the same calls, in the same order, as
Pipeline.generate)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from sdrt.engine import scheduler
from sdrt.engine.conditioning import emphasize
from sdrt.engine.pipeline import Result, to_uint8
from sdrt.engine.timing import Clock


@dataclass
class Sample:
    """One image to draw."""
    prompt: str
    negative: str
    seed: int


def noise_for(pipe, dims, seeds: list[int]) -> np.ndarray:
    """ε for each seed, drawn as Pipeline.initial_latents draws a batch of one."""
    shape = (1, pipe.config.latent_channels, dims["latent_h"], dims["latent_w"])
    return np.concatenate([np.random.default_rng(s).standard_normal(shape, dtype=np.float32) for s in seeds])


def run(pipe, samples: list[Sample], steps: int, guidance: float, height: int | None, width: int | None,
        clip_skip: int = 1, image=None, mask=None, strength=None, on_step=None) -> Result:
    """Draw every sample in one call. image/mask: a PIL image each (image to image, inpainting),
    shared by every sample. on_step(done, total) runs after each denoising step."""
    t0 = time.perf_counter()
    batch = len(samples)
    source = pipe.source(image, mask, False, None, None)
    variant = pipe.variant(source)
    if source is not None:
        height, width = source.height, source.width
    cond = pipe.conditioning(pipe.embeddings)
    layers = pipe.check_clip_skip(clip_skip)
    table = scheduler.step_table(pipe.scheduler, steps, guidance)
    strength = pipe.strength(source, strength)
    start = scheduler.start_index(steps, strength) if source is not None else 0
    prompts = [s.prompt for s in samples]
    rows = [s.negative for s in samples] + prompts if guidance > 1.0 else prompts
    text = cond.rows(rows)
    dims = pipe.dims(height, width, batch, guidance, chunks=len(text.ids) // len(rows))
    noise = noise_for(pipe, dims, [s.seed for s in samples])
    embeds = cond.lookup(text.ids)
    t_tok = time.perf_counter()

    fresh = (dims, variant) not in pipe.plans
    plan = pipe.plan(dims, variant)
    vae_runs = pipe.vae_bindings(plan, dims, plan.vae_batch)
    t_plan = time.perf_counter()
    buf, clock = plan.buf, Clock(pipe.backend.stream)
    buf["inputs_embeds"].write(embeds)
    buf["clip_skip"].write(layers)
    buf["step_index_0"].write(np.array([start], np.int32))
    buf["step_table"].write(table[:, :buf["step_table"].shape[1]])
    clock.mark("start")
    plan.text.run()
    if (text.weights != 1.0).any():
        buf["text_rows"].write(emphasize(buf["text_rows"].read(), text.weights))
    clock.mark("text_encoder")
    x = noise if source is None else pipe.image_latents(plan, source, variant, noise, steps, start, strength)
    clock.mark("vae_encoder")
    buf["latents_0"].write(x)
    for i in range(steps - start):
        plan.steps[i % 2].run()
        clock.mark("step")
        if on_step is not None:
            on_step(start + i + 1, steps)
    if (steps - start) % 2:
        buf["latents_0"].copy_from(buf["latents_1"])
    for vae in vae_runs:
        vae.run()
    clock.mark("vae")
    out = buf["image"].read()
    pipe.check_finite(out, buf)
    timings = pipe.timings(clock, t0, t_tok)
    timings["setup_ms"] = (t_plan - t_tok) * 1e3 if fresh else 0.0
    pipe.graph = plan.graph
    return Result(to_uint8(out), timings)
