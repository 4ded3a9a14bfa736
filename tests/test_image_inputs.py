"""Image to image and inpainting on ONNX Runtime CPU against diffusers' own pipelines (CPU, FP32).

diffusers gets the same noise (its randn_tensor patched to return ours) and, like sdrt, the
posterior's mean (its retrieve_latents patched to sample_mode="argmax"); everything else is its
own code: image processor, get_timesteps, add_noise, mask handling, the 4-channel blend.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, run_cli
from sdrt.engine.pipeline import Pipeline

H, W = 64, 96                          # non-square
PROMPT, NEGATIVE = "a watercolor fox in the snow", "blurry, low quality"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_image(h=H, w=W, seed=0) -> Image.Image:
    """A smooth picture with some structure (gradients and a disc), RGB."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * x / w
    g = 255 * y / h
    b = 255 * ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (h / 3) ** 2)
    noise = np.random.default_rng(seed).integers(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(np.stack([r, g, b], -1) + noise, 0, 255).astype(np.uint8))


def test_mask(h=H, w=W) -> Image.Image:
    """White (repaint) on a rectangle that is not latent-aligned, grey levels around 0.5 on its edge."""
    m = np.zeros((h, w), np.uint8)
    m[10:45, 30:77] = 255
    m[9, 30:77] = 130                  # >= 0.5 after /255: repaint
    m[45, 30:77] = 120                 # < 0.5: keep
    return Image.fromarray(m)


test_image.__test__ = test_mask.__test__ = False   # helpers, not tests


def _patched(monkeypatch, module, noise):
    """diffusers' pipeline module with our noise and the posterior mean."""
    import torch
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise).reshape(shape))
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())


def _load(cls, model_dir):
    import torch
    from diffusers import DDIMScheduler
    pipe = cls.from_pretrained(model_dir, dtype=torch.float32, safety_checker=None,
                               requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_img2img(monkeypatch, model_dir, image, noise, steps, strength, guidance):
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as mod
    _patched(monkeypatch, mod, noise)
    pipe = _load(StableDiffusionImg2ImgPipeline, model_dir)
    b = len(noise)
    out = pipe(prompt=[PROMPT] * b, negative_prompt=[NEGATIVE] * b, image=[image] * b, strength=strength,
               num_inference_steps=steps, guidance_scale=guidance, output_type="np")
    return (out.images * 255).round().astype(np.uint8)


def diffusers_inpaint(monkeypatch, model_dir, image, mask, noise, steps, strength, guidance):
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as mod
    _patched(monkeypatch, mod, noise)
    pipe = _load(StableDiffusionInpaintPipeline, model_dir)
    b = len(noise)
    out = pipe(prompt=[PROMPT] * b, negative_prompt=[NEGATIVE] * b, image=image, mask_image=mask,
               height=image.height, width=image.width, strength=strength, num_inference_steps=steps,
               guidance_scale=guidance, output_type="np")
    return (out.images * 255).round().astype(np.uint8)


def noise_for(b=2, h=H, w=W, seed=7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, 4, h // 8, w // 8)).astype(np.float32)


@pytest.mark.parametrize("steps,strength,guidance", [(10, 0.75, 7.5), (7, 0.5, 1.0)])
def test_img2img_matches_diffusers(monkeypatch, tiny_dir, tiny_fp32, steps, strength, guidance):
    """Batch 2, non-square, negative prompt; 7 x 0.5 runs an odd number of steps (3) from index 4."""
    noise = noise_for()
    ref = diffusers_img2img(monkeypatch, tiny_dir, test_image(), noise, steps, strength, guidance)
    res = Pipeline(tiny_fp32, backend="onnxruntime-cpu").generate(
        PROMPT, negative=NEGATIVE, steps=steps, guidance=guidance, batch=2, latents=noise,
        image=test_image(), strength=strength)
    assert res.images.shape == ref.shape == (2, H, W, 3)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)
    assert len(res.timings["steps_ms"]) == int(steps * strength)
    assert res.timings["vae_encoder_ms"] > 0


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_4_channel_unet_matches_diffusers(monkeypatch, tiny_dir, tiny_fp32, strength):
    """The blend step graph: the known region re-noised to the next timestep after every step."""
    noise, steps = noise_for(seed=8), 9
    ref = diffusers_inpaint(monkeypatch, tiny_dir, test_image(), test_mask(), noise, steps, strength, 7.5)
    res = Pipeline(tiny_fp32, backend="onnxruntime-cpu").generate(
        PROMPT, negative=NEGATIVE, steps=steps, batch=2, latents=noise, image=test_image(),
        mask=test_mask(), strength=strength)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)
    # the kept region follows the input image much more closely than the repainted one
    img = np.asarray(test_image()).astype(np.float64)
    keep = np.asarray(test_mask()) < 128
    err = np.abs(res.images[0].astype(np.float64) - img).mean(-1)
    assert err[keep].mean() < err[~keep].mean()


@pytest.mark.parametrize("strength,guidance", [(1.0, 7.5), (0.7, 1.0)])
def test_inpaint_9_channel_unet_matches_diffusers(monkeypatch, tiny_inpaint_dir, tiny_inpaint_fp32,
                                                  strength, guidance):
    noise, steps = noise_for(seed=9), 8
    ref = diffusers_inpaint(monkeypatch, tiny_inpaint_dir, test_image(), test_mask(), noise, steps,
                            strength, guidance)
    res = Pipeline(tiny_inpaint_fp32, backend="onnxruntime-cpu").generate(
        PROMPT, negative=NEGATIVE, steps=steps, guidance=guidance, batch=2, latents=noise,
        image=test_image(), mask=test_mask(), strength=strength)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)


@pytest.mark.parametrize("inpainting_unet", [False, True], ids=["blend", "concat"])
def test_long_prompt_inpainting_matches_diffusers(monkeypatch, tiny_dir, tiny_fp32, tiny_inpaint_dir,
                                                  tiny_inpaint_fp32, inpainting_unet):
    """Both inpainting step variants take a long prompt's [2B, 77 k, D] text embeddings (the dynamic
    text_seq), against diffusers' inpainting pipeline fed the same chunks as prompt_embeds."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as mod
    from test_prompts import LONG, NEGATIVE_LONG, encode, reference_chunks
    model_dir, work = (tiny_inpaint_dir, tiny_inpaint_fp32) if inpainting_unet else (tiny_dir, tiny_fp32)
    noise, steps, strength = noise_for(b=1, seed=10), 7, 0.7
    _patched(monkeypatch, mod, noise)
    ref_pipe = _load(StableDiffusionInpaintPipeline, model_dir)
    pos, neg = reference_chunks(ref_pipe.tokenizer, LONG), reference_chunks(ref_pipe.tokenizer, NEGATIVE_LONG)
    k = max(len(pos), len(neg))
    assert k >= 2
    out = ref_pipe(prompt_embeds=encode(ref_pipe, pos, k), negative_prompt_embeds=encode(ref_pipe, neg, k),
                   image=test_image(), mask_image=test_mask(), height=H, width=W, strength=strength,
                   num_inference_steps=steps, guidance_scale=7.5, output_type="np")
    ref = (out.images * 255).round().astype(np.uint8)
    pipe = Pipeline(work, backend="onnxruntime-cpu")
    res = pipe.generate(LONG, negative=NEGATIVE_LONG, steps=steps, latents=noise, image=test_image(),
                        mask=test_mask(), strength=strength)
    assert {(d.chunks, v) for d, v, _controlnets in pipe.plans} == {(k, "concat" if inpainting_unet else "blend")}
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)


def test_image_processing_matches_diffusers():
    """Resize (Lanczos, rounded down), RGBA / greyscale conversion, mask binarisation and its
    nearest-neighbour downsampling, against VaeImageProcessor and torch's interpolate."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from sdrt.engine import image_input
    img, mask = test_image(70, 101), test_mask(70, 101)
    src = image_input.prepare(img.convert("RGBA"), mask.convert("RGB"), 8, resize=True)
    assert (src.height, src.width) == (64, 96)
    ref = VaeImageProcessor(vae_scale_factor=8).preprocess(img).numpy()
    ref_mask = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                                 do_convert_grayscale=True).preprocess(mask.convert("RGB"), height=64, width=96)
    assert np.array_equal(src.image, ref)
    assert np.array_equal(src.mask, ref_mask.numpy())
    assert np.array_equal(src.masked_image, (torch.from_numpy(ref) * (ref_mask < 0.5)).numpy())
    small = torch.nn.functional.interpolate(ref_mask, size=(8, 12)).numpy()
    assert np.array_equal(src.latent_mask(8), small)
    grey = image_input.prepare(np.asarray(img.convert("L")), None, 8, resize=True)
    assert grey.image.shape == (1, 3, 64, 96) and np.allclose(grey.image[:, 0], grey.image[:, 2])


def test_cli_img2img_and_inpaint(tiny_fp32, tmp_path):
    test_image().save(tmp_path / "in.png")
    test_mask().save(tmp_path / "mask.png")
    p = run_cli("generate", tiny_fp32, "a fox", "--image", tmp_path / "in.png", "--steps", "4",
                "--backend", "onnxruntime-cpu", "--out", tmp_path / "a.png", "--timings")
    assert p.returncode == 0, p.stderr
    assert Image.open(tmp_path / "a.png").size == (W, H) and "vae encoder" in p.stderr
    p = run_cli("generate", tiny_fp32, "a fox", "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png",
                "--strength", "0.5", "--steps", "4", "--out", tmp_path / "b.png")
    assert p.returncode == 0, p.stderr
    assert Image.open(tmp_path / "b.png").size == (W, H)


def _inputs(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    test_image().save(tmp_path / "in.png")
    test_mask().save(tmp_path / "mask.png")
    test_mask(H, W + 8).save(tmp_path / "wide.png")
    test_image(H + 3, W).save(tmp_path / "odd.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    return tmp_path


@pytest.mark.parametrize("args,words", [
    (["--image", "junk.png"], ["cannot read image", "junk.png"]),
    (["--image", "missing.png"], ["cannot read image", "missing.png"]),
    (["--image", "in.png", "--mask", "wide.png"], ["104x64", "96x64"]),
    (["--image", "in.png", "--strength", "0"], ["strength 0", "(0, 1]"]),
    (["--image", "in.png", "--strength", "1.5"], ["strength 1.5", "(0, 1]"]),
    (["--image", "in.png", "--strength", "0.1"], ["leaves no step"]),
    (["--mask", "mask.png"], ["--mask needs --image"]),
    (["--strength", "0.5"], ["--strength needs --image"]),
    (["--image", "odd.png"], ["96x67", "--resize", "96x64"]),
    (["--image", "in.png", "--height", "128"], ["--height 128", "96x64"]),
])
def test_generate_bad_image_inputs(tiny_fp32, tmp_path, args, words):
    work = _inputs(tmp_path / "in")
    out = tmp_path / "out" / "o.png"
    p = run_cli("generate", tiny_fp32, "x", "--steps", "4", "--out", out,
                *[str(work / a) if a.endswith(".png") else a for a in args])
    assert_user_error(p, *words)
    assert not (tmp_path / "out").exists()


def test_inpainting_export_needs_a_mask(tiny_inpaint_fp32, tmp_path):
    work = _inputs(tmp_path / "in")
    out = tmp_path / "out" / "o.png"
    assert_user_error(run_cli("generate", tiny_inpaint_fp32, "x", "--steps", "2", "--out", out),
                      "inpainting UNet", "--image and --mask")
    assert_user_error(run_cli("generate", tiny_inpaint_fp32, "x", "--steps", "2", "--out", out,
                              "--image", work / "in.png"), "inpainting UNet", "--image and --mask")
    assert not (tmp_path / "out").exists()


def test_resize_rounds_down_like_diffusers(tiny_fp32, tmp_path):
    work = _inputs(tmp_path)
    p = run_cli("generate", tiny_fp32, "x", "--steps", "2", "--image", work / "odd.png", "--resize",
                "--out", tmp_path / "r.png")
    assert p.returncode == 0, p.stderr
    assert Image.open(tmp_path / "r.png").size == (W, H)


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt_rtx") is None,
                    reason="tensorrt_rtx not installed (pip install 'sdrt[tensorrt-rtx]')")
def test_inpainting_engines_build_and_old_keys_are_stale(tiny_inpaint_fp32, tmp_path):
    """`sdrt build` of a 9-channel export builds its inpainting step and the VAE encoder (batch 1);
    an engine keyed before the I/O contract was part of the key is stale: the runtime refuses it in
    one line, the next build rebuilds it."""
    import json
    import shutil

    from sdrt import manifest as mf
    from sdrt.engine import engine_keys as engine_cache
    from sdrt.errors import UserError
    rtx = "tensorrt-rtx"
    work = tmp_path / "work"
    shutil.copytree(tiny_inpaint_fp32, work)
    p = run_cli("build", work, "--backend", rtx, "--height", "64", "--width", "96", "--batch", "2")
    assert p.returncode == 0, p.stderr
    engines = mf.load(work)["engines"][rtx]
    assert sorted(engines) == ["denoise_step_inpaint_cfg", "text_encoder", "vae_decoder", "vae_encoder"]
    step = engines["denoise_step_inpaint_cfg"]["key"]["profile"]
    assert step["masked_image_latents"]["opt"] == [2, 4, 8, 12] and step["mask"]["opt"] == [2, 1, 8, 12]
    assert engines["vae_encoder"]["key"]["profile"]["image"]["opt"] == [1, 3, 64, 96]
    for name in engines:
        engine_cache.check_engine(work, rtx, name)
    man = json.loads((work / "manifest.json").read_text())       # as an older sdrt recorded it
    del man["engines"][rtx]["denoise_step_inpaint_cfg"]["key"]["io"]
    (work / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(UserError, match="denoise_step_inpaint_cfg is stale: io changed.*sdrt build") as e:
        engine_cache.check_engine(work, rtx, "denoise_step_inpaint_cfg")
    assert "\n" not in str(e.value)
    p = run_cli("build", work, "--backend", rtx, "--height", "64", "--width", "96", "--batch", "2")
    assert p.returncode == 0 and "building denoise_step_inpaint_cfg" in p.stderr and "io changed" in p.stderr
    assert "text_encoder: up to date" in p.stderr
    engine_cache.check_engine(work, rtx, "denoise_step_inpaint_cfg")


def test_export_without_encoder_says_export_again(tiny_fp32, tmp_path):
    """An export made before image inputs existed (no vae_encoder, no blend step): one line."""
    import json
    import shutil
    work = tmp_path / "old"
    shutil.copytree(tiny_fp32, work)
    man = json.loads((work / "manifest.json").read_text())
    for name in ("vae_encoder", "denoise_step_blend_cfg", "denoise_step_blend"):
        del man["models"][name]
    (work / "manifest.json").write_text(json.dumps(man))
    inputs = _inputs(tmp_path / "in")
    out = tmp_path / "out" / "o.png"
    assert_user_error(run_cli("generate", work, "x", "--steps", "2", "--image", inputs / "in.png", "--out", out),
                      "no vae_encoder", "sdrt export")
    assert_user_error(run_cli("generate", work, "x", "--steps", "2", "--image", inputs / "in.png",
                              "--mask", inputs / "mask.png", "--out", out), "no denoise_step_blend_cfg", "sdrt export")
    assert not (tmp_path / "out").exists()
