"""ControlNet with inpainting against diffusers' StableDiffusionControlNetInpaintPipeline: a
4-channel UNet (the blend step: the known region re-noised after every step) and a 9-channel
inpainting UNet (the concat step; the ControlNet reads the 4-channel latents, as diffusers'
`control_model_input`), CPU, FP32, ONNX Runtime, the same noise and the posterior's mean."""
from __future__ import annotations

import numpy as np
import pytest

from test_controlnet import (H, NEGATIVE, PROMPT, SPEC, W, cn1_export, cn_folders, control_picture,  # noqa: F401
                             noise, psnr)
from sdrt.engine.pipeline import Pipeline

STEPS = 5


def picture():
    from PIL import Image
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    rgb = np.stack([255 * x / W, 255 * y / H, 255 * ((x - W / 2) ** 2 + (y - H / 2) ** 2 < (H / 3) ** 2)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def mask():
    """White (repaint) on a rectangle that is not latent-aligned."""
    from PIL import Image
    m = np.zeros((H, W), np.uint8)
    m[10:45, 30:77] = 255
    return Image.fromarray(m)


@pytest.fixture(scope="session")
def cn_inpaint_folder(cn_folders, tmp_path_factory):
    """A 9-channel inpainting UNet of the same block layout as cn_folders' ControlNets."""
    from sdrt.export.init_models import pipeline_from_spec
    spec = {**SPEC, "pipeline": "StableDiffusionInpaintPipeline", "unet": {**SPEC["unet"], "in_channels": 9}}
    path = tmp_path_factory.mktemp("controlnet") / "sd-inpaint"
    pipeline_from_spec(spec, seed=6).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def cn_inpaint_export(cn_folders, cn_inpaint_folder, tmp_path_factory):
    from sdrt.export.export import export
    return export(cn_inpaint_folder, tmp_path_factory.mktemp("work") / "cn-inpaint", precision="fp32",
                  controlnets=cn_folders[1][:1])


def diffusers_inpaint(monkeypatch, sd, cn_dir, control, eps, scale, window, strength):
    import torch
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetInpaintPipeline
    from diffusers.pipelines.controlnet import pipeline_controlnet_inpaint as module
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(eps).reshape(shape))
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())
    pipe = StableDiffusionControlNetInpaintPipeline.from_pretrained(
        sd, controlnet=ControlNetModel.from_pretrained(cn_dir), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, negative_prompt=NEGATIVE, image=picture(), mask_image=mask(), control_image=control,
               height=H, width=W, strength=strength, controlnet_conditioning_scale=scale,
               control_guidance_start=window[0], control_guidance_end=window[1], num_inference_steps=STEPS,
               guidance_scale=7.5, output_type="np")
    return (out.images * 255).round().astype(np.uint8)


def sdrt_inpaint(work, control, eps, scale, window, strength):
    return Pipeline(work, backend="onnxruntime-cpu").generate(
        PROMPT, negative=NEGATIVE, steps=STEPS, guidance=7.5, latents=eps, image=picture(), mask=mask(),
        strength=strength, control=[(control, scale, *window)]).images


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_controlnet_inpainting_4_channel_unet_matches_diffusers(monkeypatch, cn_folders, cn1_export, strength):
    sd, cns = cn_folders
    control, eps, window = control_picture(21), noise(21), (0.0, 0.8)
    ref = diffusers_inpaint(monkeypatch, sd, cns[0], control, eps, 0.9, window, strength)
    got = sdrt_inpaint(cn1_export, control, eps, 0.9, window, strength)
    assert psnr(got, ref) >= 50, psnr(got, ref)
    if strength == 1.0:                    # the ControlNet counts: 10 % off is another image
        assert psnr(sdrt_inpaint(cn1_export, control, eps, 0.99, window, strength), ref) < 50


def test_controlnet_inpainting_9_channel_unet_matches_diffusers(monkeypatch, cn_folders, cn_inpaint_folder,
                                                                cn_inpaint_export):
    _, cns = cn_folders
    control, eps, window = control_picture(22), noise(22), (0.1, 1.0)
    ref = diffusers_inpaint(monkeypatch, cn_inpaint_folder, cns[0], control, eps, 1.0, window, 1.0)
    got = sdrt_inpaint(cn_inpaint_export, control, eps, 1.0, window, 1.0)
    assert psnr(got, ref) >= 50, psnr(got, ref)
    assert psnr(sdrt_inpaint(cn_inpaint_export, control, eps, 0.0, window, 1.0), ref) < 50   # it counts
