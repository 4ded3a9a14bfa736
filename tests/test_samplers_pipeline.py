"""Every sampler through the whole runtime (ONNX Runtime CPU, FP32) against diffusers' pipelines
with the corresponding scheduler class/config, the same initial latents and the same per-step
noise (fed to diffusers' scheduler by tests/diffusers_samplers.feed_noise): PSNR >= 50 dB.
An epsilon model (the tiny test model) and a v-prediction one (the same export with its scheduler
config switched to v_prediction, and to zero-SNR betas with trailing spacing)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from diffusers_samplers import CASES, feed_noise, scheduler_for
from sdrt.engine import samplers
from sdrt.engine.pipeline import Pipeline
from test_image_inputs import _patched, noise_for, test_image, test_mask

H, W, B, STEPS = 64, 64, 2, 8
PROMPT, NEGATIVE = "a watercolor fox in the snow", "blurry, low quality"
V = {"prediction_type": "v_prediction"}
V_ZERO_SNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def work_dir_with(src, dst, config: dict):
    """A copy of an export whose scheduler config has `config`'s keys (same ONNX graphs)."""
    shutil.copytree(src, dst)
    path = dst / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return dst


@pytest.fixture(scope="module")
def pipes(tiny_fp32, tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler-configs")
    return {"eps": Pipeline(tiny_fp32, backend="onnxruntime-cpu"),
            "v": Pipeline(work_dir_with(tiny_fp32, root / "v", V), backend="onnxruntime-cpu"),
            "v0": Pipeline(work_dir_with(tiny_fp32, root / "v0", V_ZERO_SNR), backend="onnxruntime-cpu")}


@pytest.fixture(scope="module")
def reference(tiny_dir):
    import torch
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(steps=STEPS, seed=7):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, 4, H // 8, W // 8), dtype=np.float32),
            rng.standard_normal((steps, B, 4, H // 8, W // 8), dtype=np.float32))


def diffusers_images(pipe, kind, schedule, config, latents, noise, steps, guidance, guided=None):
    """diffusers' text to image; `guided`: steps run with guidance before the CFG cut-off callback
    (diffusers' SDCFGCutoffCallback: guidance 0 and the conditional embeddings only)."""
    import torch
    base = dict(pipe.scheduler.config)
    pipe.scheduler = scheduler_for(kind, schedule, {**base, **config})
    kw = {}
    if guided is not None:
        def cutoff(p, i, t, tensors):
            if i == guided - 1:
                p._guidance_scale = 0.0
                tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[1]
            return tensors
        kw = dict(callback_on_step_end=cutoff, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    try:
        with feed_noise(pipe.scheduler, noise):
            out = pipe(prompt=[PROMPT] * B, negative_prompt=[NEGATIVE] * B, num_inference_steps=steps,
                       guidance_scale=guidance, height=H, width=W, latents=torch.from_numpy(latents),
                       output_type="np", **kw)
    finally:
        pipe.scheduler = scheduler_for("ddim", None, base)
    return (out.images * 255).round().astype(np.uint8)


def ours(pipe, kind, schedule, latents, noise, steps=STEPS, guidance=7.5, **kw):
    return pipe.generate(PROMPT, negative=NEGATIVE, steps=steps, guidance=guidance, height=H, width=W, batch=B,
                         latents=latents, noise=noise, sampler=kind, schedule=schedule, **kw)


@pytest.mark.parametrize("kind,schedule", CASES)
def test_text_to_image_matches_diffusers(pipes, reference, kind, schedule):
    latents, noise = inputs()
    res = ours(pipes["eps"], kind, schedule, latents, noise)
    ref = diffusers_images(reference, kind, schedule, {}, latents, noise, STEPS, 7.5)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)
    assert res.images.std() > 1


@pytest.mark.parametrize("model,kind,schedule", [
    ("v", "ddim", None), ("v", "ddpm", None), ("v", "euler", None), ("v", "euler_a", None),
    ("v", "dpmpp_2m", "karras"), ("v", "dpmpp_2m_sde", None), ("v", "lcm", None),
    ("v0", "ddim", None), ("v0", "euler", None), ("v0", "euler_a", None), ("v0", "dpmpp_2m", None),
    ("v0", "dpmpp_2m_sde", "karras"), ("v0", "ddpm", None)])
def test_v_prediction_matches_diffusers(pipes, reference, model, kind, schedule):
    latents, noise = inputs(seed=8)
    res = ours(pipes[model], kind, schedule, latents, noise)
    ref = diffusers_images(reference, kind, schedule, V if model == "v" else V_ZERO_SNR, latents, noise, STEPS, 7.5)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)


@pytest.mark.parametrize("kind,schedule", [("dpmpp_2m", "karras"), ("euler_a", None)])
def test_cfg_cutoff_matches_diffusers_callback(pipes, reference, kind, schedule):
    """After int(8 x 0.5) = 4 guided steps the unguided graph at batch B takes over (its state
    handed over between the two plans' buffers); diffusers: the CFG cut-off callback."""
    latents, noise = inputs(seed=9)
    res = ours(pipes["eps"], kind, schedule, latents, noise, cfg_cutoff=0.5)
    ref = diffusers_images(reference, kind, schedule, {}, latents, noise, STEPS, 7.5, guided=4)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)
    assert res.timings["guided_steps"] == 4 and res.timings["unet_evaluations"] == 4 * 2 + 4
    full = ours(pipes["eps"], kind, schedule, latents, noise)
    assert not np.array_equal(full.images, res.images)   # the cut-off changed the image
    same = ours(pipes["eps"], kind, schedule, latents, noise, cfg_cutoff=1.0)
    assert np.array_equal(same.images, full.images)


def test_guidance_one_runs_no_unconditional_half(pipes, reference):
    """LCM (as any sampler) with guidance <= 1: the step graph at batch B, no unconditional rows."""
    latents, noise = inputs(steps=4, seed=10)
    res = ours(pipes["eps"], "lcm", None, latents, noise, steps=4, guidance=1.0)
    assert res.timings["unet_evaluations"] == 4
    ref = diffusers_images(reference, "lcm", None, {}, latents, noise, 4, 1.0)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)


def diffusers_image_input(monkeypatch, model_dir, kind, image, mask, init_noise, noise, steps, strength):
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint
    cls, mod = (StableDiffusionInpaintPipeline, inpaint) if mask is not None else (StableDiffusionImg2ImgPipeline, img2img)
    _patched(monkeypatch, mod, init_noise)
    pipe = cls.from_pretrained(model_dir, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = scheduler_for(kind, None, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    start = steps - int(steps * strength)
    kw = dict(mask_image=mask, height=image.height, width=image.width) if mask is not None else {}
    with feed_noise(pipe.scheduler, noise, start):
        out = pipe(prompt=[PROMPT] * B, negative_prompt=[NEGATIVE] * B, image=image if mask is not None else [image] * B,
                   strength=strength, num_inference_steps=steps, guidance_scale=7.5, output_type="np", **kw)
    return (out.images * 255).round().astype(np.uint8)


@pytest.mark.parametrize("kind,mask,strength", [
    ("euler", False, 0.6), ("dpmpp_2m_sde", False, 0.6), ("lcm", False, 0.75),
    ("euler_a", True, 1.0), ("dpmpp_2m", True, 0.6), ("ddpm", True, 0.6)])
def test_image_inputs_match_diffusers(monkeypatch, pipes, tiny_dir, kind, mask, strength):
    """Image to image (add_noise per sampler: Euler's x0 + σ ε, DPM's α x0 + σ_t ε) and the
    4-channel inpainting blend (the known region re-noised with the sampler's own forward process)."""
    steps = 9
    init_noise = noise_for(b=B, h=64, w=96, seed=11)
    noise = np.random.default_rng(12).standard_normal((steps, B, 4, 8, 12), dtype=np.float32)
    m = test_mask() if mask else None
    ref = diffusers_image_input(monkeypatch, tiny_dir, kind, test_image(), m, init_noise, noise, steps, strength)
    res = pipes["eps"].generate(PROMPT, negative=NEGATIVE, steps=steps, batch=B, latents=init_noise, noise=noise,
                                image=test_image(), mask=m, strength=strength, sampler=kind)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)


def test_seeded_noise_is_reproducible_and_cli_noise_file(pipes, tiny_fp32, tmp_path):
    p = pipes["eps"]
    a = p.generate(PROMPT, steps=6, height=H, width=W, seed=4, sampler="Euler a")
    b = p.generate(PROMPT, steps=6, height=H, width=W, seed=4, sampler="Euler a")
    c = p.generate(PROMPT, steps=6, height=H, width=W, seed=5, sampler="Euler a")
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    # the documented generator: the same images from the noise it draws, given explicitly
    shape = (1, 4, H // 8, W // 8)
    z = samplers.step_noise(4, 6, shape)
    lat = np.random.default_rng(4).standard_normal(shape, dtype=np.float32)
    d = p.generate(PROMPT, steps=6, height=H, width=W, latents=lat, noise=z, sampler="euler_a")
    assert np.array_equal(a.images, d.images)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "lat.npy", lat)
    out = tmp_path / "e.png"
    proc = run_cli("generate", tiny_fp32, PROMPT, "--steps", 6, "--height", H, "--width", W, "--sampler", "EULER A",
                   "--latents", tmp_path / "lat.npy", "--noise", tmp_path / "z.npy", "--out", out)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(out)), a.images[0])


@pytest.mark.parametrize("args,words", [
    (("--sampler", "heun"), ["unknown --sampler 'heun'", "DPM++ 2M Karras"]),
    (("--schedule", "exponential"), ["unknown --schedule 'exponential'", "karras"]),
    (("--sampler", "ddim", "--schedule", "karras"), ["karras"]),
    (("--cfg-cutoff", "1.5"), ["--cfg-cutoff 1.5", "fraction"]),
    (("--sampler", "euler a", "--noise", "NOISE"), ["noise has shape", "[4, 1, 4, 8, 8]"]),
    (("--sampler", "lcm", "--steps", "60"), ["at most the 50"])])
def test_cli_bad_sampler_inputs(tiny_fp32, tmp_path, args, words):
    np.save(tmp_path / "n.npy", np.zeros((3, 1, 4, 8, 8), np.float32))
    args = tuple(str(tmp_path / "n.npy") if a == "NOISE" else a for a in args)
    out = tmp_path / "x.png"
    proc = run_cli("generate", tiny_fp32, PROMPT, "--steps", 4, "--height", H, "--width", W, *args, "--out", out)
    assert_user_error(proc, *words)
    assert not out.exists()


def test_help_lists_samplers():
    proc = run_cli("generate", "--help")
    text = " ".join(proc.stdout.split())           # argparse wraps lines
    for name in ("DPM++ 2M Karras", "Euler a", "LCM", "DDPM", "karras", "trailing", "--cfg-cutoff", "--noise"):
        assert name in text, name


def test_ddim_step_ignores_sampler_state_bit_for_bit(tiny_fp32):
    """The DDIM row's added terms are exact zeros: the step graph's outputs do not change by one
    bit whatever x̂0_prev and the noise hold (the images are those of the graph without them)."""
    import onnxruntime as ort
    from sdrt import manifest as mf
    from sdrt.contract import Dims
    from sdrt.engine.scheduler import read_config_json
    model = mf.models(mf.load(tiny_fp32))["denoise_step_cfg"]
    sess = ort.InferenceSession(str(tiny_fp32 / "onnx" / model.onnx), providers=["CPUExecutionProvider"])
    cfg = read_config_json(tiny_fp32 / "scheduler" / "scheduler_config.json")
    rng = np.random.default_rng(0)
    shapes = model.shapes(Dims(2, H, W, cfg=True, noise_steps=3))
    feed = {n: rng.standard_normal(shapes[n], dtype=np.float32) for n in ("latents", "text_embeddings")}
    feed["step_table"] = samplers.step_table(cfg, samplers.Sampler("ddim"), 10, 7.5).rows
    feed["step_index"] = np.array([2, 7], np.int32)
    zero = {n: np.zeros(shapes[n], np.float32) for n in ("x0_prev", "step_noise")}
    noisy = {n: rng.standard_normal(shapes[n], dtype=np.float32) * 100 for n in ("x0_prev", "step_noise")}
    a = sess.run(None, {**feed, **zero})
    b = sess.run(None, {**feed, **noisy})
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_nine_channel_inpainting_unet_with_a_sampler(monkeypatch, tiny_inpaint_dir, tiny_inpaint_fp32):
    """The concat step: the scaled latents (Euler's 1/sqrt(σ²+1)) concatenated with the mask and
    masked-image latents, as diffusers' inpainting pipeline does after scale_model_input."""
    steps = 7
    init_noise = noise_for(b=B, h=64, w=96, seed=13)
    noise = np.random.default_rng(14).standard_normal((steps, B, 4, 8, 12), dtype=np.float32)
    ref = diffusers_image_input(monkeypatch, tiny_inpaint_dir, "euler_a", test_image(), test_mask(), init_noise,
                                noise, steps, 1.0)
    res = Pipeline(tiny_inpaint_fp32, backend="onnxruntime-cpu").generate(
        PROMPT, negative=NEGATIVE, steps=steps, batch=B, latents=init_noise, noise=noise, image=test_image(),
        mask=test_mask(), strength=1.0, sampler="Euler a")
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)
