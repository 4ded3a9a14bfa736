"""Step-level batching (sdrt.engine.step_slots): slots at different steps, with different samplers,
step counts, guidance, prompts and noise, in one batch, give each request's own image."""
from __future__ import annotations

import numpy as np
import pytest

from sdrt.engine.pipeline import Pipeline
from sdrt.engine.samplers import Sampler, step_table
from sdrt.engine.step_slots import PARKED
from sdrt.errors import UserError

H = W = 64
SHAPE = (4, H // 8, W // 8)


def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_slots_at_different_steps_match_separate_runs(tiny_fp32):
    pipe = Pipeline(tiny_fp32, backend="onnxruntime-cpu")
    rng = np.random.default_rng(3)
    reqs = [dict(prompt="a red fox", sampler="Euler a", steps=6, guidance=7.5),
            dict(prompt="a blue boat on a lake", sampler="DPM++ 2M Karras", steps=4, guidance=4.0),
            dict(prompt="a lighthouse", sampler="DDIM", steps=5, guidance=6.0)]
    for r in reqs:
        r["latents"] = rng.standard_normal(SHAPE, dtype=np.float32)
        r["noise"] = rng.standard_normal((r["steps"], *SHAPE), dtype=np.float32)
        r["ref"] = pipe.generate(r["prompt"], negative="ugly", steps=r["steps"], guidance=r["guidance"], height=H,
                                 width=W, latents=r["latents"][None], noise=r["noise"][:, None],
                                 sampler=r["sampler"]).images[0]
    slots = pipe.step_slots(batch=2, height=H, width=W, noise_steps=16)
    offset = 0
    for r in reqs:                              # each request its own row range of the shared table
        r["table"] = step_table(pipe.scheduler_config, Sampler.parse(r["sampler"]), r["steps"], r["guidance"])
        r["row"], offset = offset, offset + r["steps"]
        slots.write_rows(r["row"], r["table"])

    def start(slot, r):
        z = r["noise"] if r["table"].stochastic else None
        slots.start(slot, r["row"], r["latents"] * np.float32(r["table"].init_sigma),
                    slots.embed(r["prompt"], "ugly"), z)
        r["slot"] = slot

    start(0, reqs[0])
    slots.advance()
    slots.advance()
    start(1, reqs[1])                           # joins while request 0 is at its third step
    waiting, running, done = [reqs[2]], [reqs[0], reqs[1]], []
    for _ in range(20):
        slots.advance()
        for r in list(running):
            if slots.finished(r["slot"], r["row"] + r["steps"] - 1):
                r["latents_out"] = slots.latents(r["slot"])
                running.remove(r)
                done.append(r)
                if waiting:                     # the freed slot takes the next request
                    nxt = waiting.pop(0)
                    start(r["slot"], nxt)
                    running.append(nxt)
                else:
                    slots.park(r["slot"])
        if not running:
            break
    assert len(done) == 3 and (slots.index == PARKED).all()
    for r in reqs:
        img = slots.decode(r["latents_out"][None])[0]
        assert psnr(img, r["ref"]) >= 50, (r["sampler"], psnr(img, r["ref"]))


def test_slot_bad_values(tiny_fp32):
    pipe = Pipeline(tiny_fp32, backend="onnxruntime-cpu")
    slots = pipe.step_slots(batch=1, height=H, width=W)
    with pytest.raises(UserError, match="slot 3"):
        slots.park(3)
    with pytest.raises(UserError, match="do not fit"):
        slots.write_rows(PARKED - 2, step_table(pipe.scheduler_config, Sampler(), 5, 7.5))
