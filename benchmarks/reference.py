"""The eager PyTorch reference: diffusers' StableDiffusionPipeline with DDIM (FP16 + SDPA on a
GPU, FP32 on CPU), timed per stage with CUDA events recorded by forward hooks on its modules.
With an input image: StableDiffusionImg2ImgPipeline, with a mask StableDiffusionInpaintPipeline,
on the same modules, given sdrt's noise and the posterior mean (sdrt's deterministic encoder).
An upscaler folder: StableDiffusionUpscalePipeline, given sdrt's latents and low-res image noise."""
from __future__ import annotations

import time
from contextlib import contextmanager
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
        from sdrt.export.pipeline_folder import read_model_index
        from sdrt.export.upscaler import is_upscaler
        self.upscaler = is_upscaler(read_model_index(model_dir))
        if self.upscaler:
            from diffusers import StableDiffusionUpscalePipeline
            pipe = StableDiffusionUpscalePipeline.from_pretrained(model_dir, dtype=dtype)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=dtype)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to("cuda" if self.cuda else "cpu")
        self.marks: dict[str, list] = {}
        for name, module in (("text_encoder", pipe.text_encoder), ("unet", pipe.unet),
                             ("vae", pipe.vae.decoder), ("vae_encoder", pipe.vae.encoder)):
            module.register_forward_pre_hook(self._hook(name, "start"))
            module.register_forward_hook(self._hook(name, "end"))
        self._time_tokenizer(pipe.tokenizer)

    def _time_tokenizer(self, tokenizer) -> None:
        """Tokenizer calls timed on the host clock (it runs on the CPU): the instance becomes a
        subclass whose __call__ adds its time to self.tokenize_ms (isinstance checks still hold)."""
        cls, self.tokenize_ms = type(tokenizer), 0.0

        def timed_call(tok, *args, **kwargs):
            t = time.perf_counter()
            try:
                return cls.__call__(tok, *args, **kwargs)
            finally:
                self.tokenize_ms += (time.perf_counter() - t) * 1e3
        tokenizer.__class__ = type(f"Timed{cls.__name__}", (cls,), {"__call__": timed_call})

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

    def run(self, prompt, negative, steps, guidance, height, width, latents: np.ndarray,
            image=None, mask=None, strength=None, noise_level=None, image_noise=None):
        """Images (uint8 NHWC) and per-stage timings of one full pipeline call (the tokenizer on the
        host clock, the modules on CUDA events on a GPU; denoise: the UNet calls). With `image`
        (a PIL image), `latents` is the noise added to its latents."""
        torch = self.torch
        self.marks, self.tokenize_ms = {}, 0.0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        b = len(latents)
        noise = torch.from_numpy(latents).to(self.pipe.device, self.pipe.unet.dtype)
        common = dict(prompt=[prompt] * b, negative_prompt=[negative] * b, num_inference_steps=steps,
                      guidance_scale=guidance, output_type="np")
        if image is not None and not self.upscaler:   # built (once) outside the timed call
            pipe, module = self.image_pipeline(mask is not None)
        t0 = time.perf_counter()
        if self.upscaler:        # sdrt's latents, and its image noise drawn by the pipeline
            from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_upscale as up
            saved, per_image = up.randn_tensor, torch.from_numpy(np.repeat(image_noise, b, 0))
            up.randn_tensor = lambda shape, generator=None, device=None, dtype=None, layout=None: \
                per_image.to(device=device, dtype=dtype).reshape(shape)
            try:
                out = self.pipe(image=[image] * b, noise_level=noise_level, latents=noise, **common)
            finally:
                up.randn_tensor = saved
        elif image is None:
            out = self.pipe(height=height, width=width, latents=noise, **common)
        else:
            with same_noise(module, noise):
                if mask is None:
                    out = pipe(image=[image] * b, strength=0.75 if strength is None else strength, **common)
                else:
                    out = pipe(image=image, mask_image=mask, height=height, width=width,
                               strength=1.0 if strength is None else strength, **common)
        if self.cuda:
            torch.cuda.synchronize()
        e2e = (time.perf_counter() - t0) * 1e3
        stage = {name: [self._ms(a[1], z[1]) for a, z in zip(m[0::2], m[1::2])]
                 for name, m in self.marks.items()}
        timings = {"e2e_ms": e2e, "text_encoder_ms": sum(stage["text_encoder"]),
                   "tokenize_ms": self.tokenize_ms,
                   "vae_encoder_ms": sum(stage.get("vae_encoder", [])) if image is not None and not self.upscaler
                   else None,
                   "unet_step_ms": float(np.median(stage["unet"])), "denoise_ms": sum(stage["unet"]),
                   "steps_ms": stage["unet"], "vae_ms": sum(stage["vae"]),
                   "peak_mem_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if self.cuda else None}
        return (out.images * 255).round().astype(np.uint8), timings

    def image_pipeline(self, inpaint: bool):
        """The img2img / inpainting pipeline on the same modules, and its module (to patch);
        made once per kind."""
        cache = self.__dict__.setdefault("_image_pipes", {})
        if inpaint not in cache:
            cache[inpaint] = self._make_image_pipeline(inpaint)
        return cache[inpaint]

    def _make_image_pipeline(self, inpaint: bool):
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
        from diffusers.pipelines.stable_diffusion import (pipeline_stable_diffusion_img2img as img2img,
                                                          pipeline_stable_diffusion_inpaint as inpainting)
        cls, module = (StableDiffusionInpaintPipeline, inpainting) if inpaint else (StableDiffusionImg2ImgPipeline, img2img)
        pipe = cls(**self.pipe.components, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe, module

    def close(self):
        del self.pipe
        if self.cuda:
            self.torch.cuda.empty_cache()


@contextmanager
def same_noise(module, noise):
    """diffusers' pipeline `module` draws `noise` instead of random noise, and encodes to the
    posterior mean (sample_mode="argmax") instead of a sample: sdrt's inputs exactly."""
    saved = module.randn_tensor, module.retrieve_latents
    module.randn_tensor = lambda shape, generator=None, device=None, dtype=None, layout=None: \
        noise.to(device=device, dtype=dtype).reshape(shape)
    module.retrieve_latents = lambda out, generator=None, sample_mode="sample": out.latent_dist.mode()
    try:
        yield
    finally:
        module.randn_tensor, module.retrieve_latents = saved
