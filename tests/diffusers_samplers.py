"""The diffusers scheduler that corresponds to each sdrt sampler, and a shim that feeds it our
per-step noise (tests only: torch and diffusers)."""
from __future__ import annotations

import contextlib
import sys

import numpy as np

# (sampler, schedule) cases run against diffusers; schedule None = the config's own spacing
CASES = [("ddim", None), ("ddim", "trailing"), ("ddpm", None), ("ddpm", "trailing"),
         ("euler", None), ("euler", "karras"), ("euler", "trailing"),
         ("euler_a", None), ("euler_a", "trailing"),
         ("dpmpp_2m", None), ("dpmpp_2m", "karras"), ("dpmpp_2m", "trailing"),
         ("dpmpp_2m_sde", None), ("dpmpp_2m_sde", "karras"), ("lcm", None)]


def scheduler_for(kind: str, schedule: str | None, config: dict):
    """diffusers' scheduler for an sdrt sampler, built from the folder's config like from_config."""
    import diffusers as d
    extra = {}
    if schedule == "karras":
        extra["use_karras_sigmas"] = True
    if schedule == "trailing":
        extra["timestep_spacing"] = "trailing"
    cls = {"ddim": d.DDIMScheduler, "ddpm": d.DDPMScheduler, "euler": d.EulerDiscreteScheduler,
           "euler_a": d.EulerAncestralDiscreteScheduler, "dpmpp_2m": d.DPMSolverMultistepScheduler,
           "dpmpp_2m_sde": d.DPMSolverMultistepScheduler, "lcm": d.LCMScheduler}[kind]
    if kind == "dpmpp_2m":
        extra.update(algorithm_type="dpmsolver++", solver_order=2)
    if kind == "dpmpp_2m_sde":
        extra.update(algorithm_type="sde-dpmsolver++", solver_order=2)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return cls.from_config({**config, **extra})


@contextlib.contextmanager
def feed_noise(sched, noise: np.ndarray, start: int = 0):
    """Make `sched.step` draw noise[start], noise[start + 1], ... (row i = step i's z) instead of
    torch's generator: every stochastic step of these schedulers draws once per step (none on the
    steps that need none: DDPM at t = 0, LCM's last), so a counter keeps the rows aligned."""
    import torch
    module = sys.modules[type(sched).__module__]
    original = module.randn_tensor
    i = [start]

    def draw(shape, *args, **kwargs):
        z = torch.from_numpy(np.ascontiguousarray(noise[i[0]])).reshape(shape)
        i[0] += 1
        return z.to(kwargs.get("dtype") or torch.float32)

    module.randn_tensor = draw
    try:
        yield
    finally:
        module.randn_tensor = original
