"""The eager PyTorch reference: diffusers' StableDiffusionPipeline with DDIM (FP16 + SDPA on a
GPU, FP32 on CPU), timed per stage with CUDA events recorded by forward hooks on its modules."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


class Reference:
    def __init__(self, model_dir: Path):
        import torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
        diffusers_logging.disable_progress_bar()   # sdrt bench prints its own progress
        transformers_logging.disable_progress_bar()
        self.torch = torch
        self.cuda = torch.cuda.is_available()
        dtype = torch.float16 if self.cuda else torch.float32
        self.description = "diffusers eager " + ("FP16, SDPA" if self.cuda else "FP32, CPU")
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=dtype)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to("cuda" if self.cuda else "cpu")
        self.marks: dict[str, list] = {}
        for name, module in (("text_encoder", pipe.text_encoder), ("unet", pipe.unet),
                             ("vae", pipe.vae.decoder)):
            module.register_forward_pre_hook(self._hook(name, "start"))
            module.register_forward_hook(self._hook(name, "end"))

    def _hook(self, name, which):
        def hook(*_):
            self.marks.setdefault(name, []).append((which, self._now()))
        return hook

    def _now(self):
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def run(self, prompt, negative, steps, guidance, height, width, latents: np.ndarray):
        """Images (uint8 NHWC) and per-stage timings of one full pipeline call."""
        torch = self.torch
        self.marks = {}
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        b = len(latents)
        t0 = time.perf_counter()
        out = self.pipe(prompt=[prompt] * b, negative_prompt=[negative] * b, num_inference_steps=steps,
                        guidance_scale=guidance, height=height, width=width, output_type="np",
                        latents=torch.from_numpy(latents).to(self.pipe.device, self.pipe.unet.dtype))
        if self.cuda:
            torch.cuda.synchronize()
        e2e = (time.perf_counter() - t0) * 1e3
        stage = {name: [self._ms(a[1], z[1]) for a, z in zip(m[0::2], m[1::2])]
                 for name, m in self.marks.items()}
        timings = {"e2e_ms": e2e, "text_encoder_ms": sum(stage["text_encoder"]),
                   "unet_step_ms": float(np.median(stage["unet"])), "vae_ms": sum(stage["vae"]),
                   "peak_mem_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if self.cuda else None}
        return (out.images * 255).round().astype(np.uint8), timings

    def close(self):
        del self.pipe
        if self.cuda:
            self.torch.cuda.empty_cache()
