"""The demo's ×4 upscaler (sdrt/demo_upscaler/): its world at 4x scale, its training stage, its
evaluation (PSNR/SSIM against bicubic, the checker on 128x128 images) and the CLI options around it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from sdrt import scenes
from sdrt.benchmarks import checker, upscale_eval
from sdrt.demo import DEMO_UPSCALER, runtime_upscales


# --- the world at 4x scale ----------------------------------------------------------------------

def test_render_scale_draws_the_same_scene_larger():
    for s in scenes.all_scenes()[::5]:
        small, big = scenes.render(s), scenes.render(s, scale=4)
        assert big.shape == (4 * scenes.SIZE, 4 * scenes.SIZE, 3)
        # nearest-neighbour shrink: the same picture but for the anti-alias-free edge rows of curves
        assert np.mean(np.any(big[2::4, 2::4] != small, axis=-1)) < 0.05, s
        assert all(checker.correct(checker.read(big), s).values()), s       # the checker reads 128x128 too
        assert scenes.downsample(big, 4).shape == small.shape


def test_checker_reads_wrong_128_images_as_wrong():
    s = scenes.Scene("circle", "red", "blue", "large", "top left")
    wrong = scenes.render(scenes.Scene("square", "green", "blue", "small", "bottom right"), scale=4)
    assert checker.correct(checker.read(wrong), s) == {"colour": False, "background": True, "shape": False,
                                                       "size": False, "position": False}


def test_psnr_and_ssim():
    a = scenes.render(scenes.Scene("triangle", "white", "black", "large"), scale=4)
    noisy = np.clip(a + np.random.default_rng(0).normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    assert upscale_eval.ssim(a, a) == pytest.approx(1.0)
    assert 0 < upscale_eval.ssim(a, noisy) < 0.9
    assert upscale_eval.psnr(a, noisy) == pytest.approx(10 * np.log10(255 ** 2 / np.mean(
        (a.astype(float) - noisy) ** 2)))
    blurred = upscale_eval.bicubic(scenes.downsample(a, 4))
    assert blurred.shape == a.shape and upscale_eval.ssim(a, blurred) < 1.0


# --- training -----------------------------------------------------------------------------------

def test_train_upscaler_smoke_reproducible_and_loads_in_diffusers(tmp_path):
    """A few steps on a few scenes: a snapshot after k steps equals a k-step run (same seed), and
    the folder is a diffusers StableDiffusionUpscalePipeline that draws 4x its input."""
    import torch
    from diffusers import StableDiffusionUpscalePipeline

    from sdrt.demo import DEMO_MODEL
    from sdrt.export.train_upscaler import train
    small = dict(vae_steps=2, decoder_steps=2, batch=2, vae_batch=2, warmup=1, snapshot_every=3, scenes=12)
    train(tmp_path / "a", DEMO_MODEL, steps=6, seed=5, **small)
    train(tmp_path / "b", DEMO_MODEL, steps=3, seed=5, **small)
    record = json.loads((tmp_path / "a" / "train_demo.json").read_text())
    assert record["prediction_type"] == "v_prediction" and record["steps"] == 6
    snap = StableDiffusionUpscalePipeline.from_pretrained(tmp_path / ".a.snapshot")
    b = StableDiffusionUpscalePipeline.from_pretrained(tmp_path / "b")
    for x, y in zip(snap.unet.parameters(), b.unet.parameters()):
        assert torch.equal(x, y)
    assert b.unet.config.in_channels == 7 and b.vae.config.scaling_factor == pytest.approx(0.08333)
    b.set_progress_bar_config(disable=True)
    from PIL import Image
    low = Image.fromarray(scenes.render(scenes.Scene("circle", "red", "blue")))
    out = b("a small red circle on a blue background", image=low, num_inference_steps=2, output_type="np",
            guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 4 * scenes.SIZE, 4 * scenes.SIZE, 3)


# --- the shipped model --------------------------------------------------------------------------

@pytest.mark.skipif(not (DEMO_UPSCALER / "model_index.json").is_file(), reason="no shipped demo upscaler")
def test_shipped_upscaler_on_diffusers_keeps_the_scene():
    """Downsampled renders upscaled by the shipped model on diffusers' own pipeline: every field read
    right by the checker at 128x128, and closer to the originals than bicubic upscaling (here by
    4.7 dB PSNR and 0.04 SSIM; by 3.9 dB and 0.027 on n=400, benchmarks/results/demo-upscaler-eval.md;
    the first upscaler, trained on latent crops, was 2.4 dB below bicubic there)."""
    up = upscale_eval.open_upscaler(DEMO_UPSCALER, steps=10)
    sc = [scenes.Scene("circle", "red", "blue", "large", "top left"),
          scenes.Scene("triangle", "yellow", "black", "small", "bottom right"),
          scenes.Scene("square", "white", "green", "large")]
    r = upscale_eval.super_resolution(up, sc, seed=0)
    assert r["upscaler"]["psnr_db"] > r["bicubic"]["psnr_db"] + 2, r
    assert r["upscaler"]["ssim"] > r["bicubic"]["ssim"] + 0.02, r
    high = upscale_eval.upscale_all(up, np.stack([scenes.render(s) for s in sc]), [s.caption for s in sc], 0, "")
    for img, s in zip(high, sc):
        assert all(checker.correct(checker.read(img), s).values()), s


def test_train_demo_help_names_the_upscaler_defaults():
    from sdrt.export.train_upscaler import DEFAULTS
    from test_readme import subcommands
    helps = {a.dest: a.help for a in subcommands()["train-demo"]._actions}
    for dest in ("upscaler_steps", "upscaler_vae_steps"):
        assert f"default {DEFAULTS[dest]}" in helps[dest], (dest, helps[dest])


# --- the CLI ------------------------------------------------------------------------------------

def test_cli_train_demo_stage_options(tmp_path):
    (tmp_path / "m-upscaler").mkdir()
    assert_user_error(run_cli("train-demo", tmp_path / "m"), "m-upscaler already exists")
    assert_user_error(run_cli("train-demo", tmp_path / "n", "--stage", "base", "--upscaler-steps", "5"),
                      "--upscaler-steps")
    assert_user_error(run_cli("train-demo", tmp_path / "n", "--base", tmp_path), "--base", "--stage upscaler")
    assert_user_error(run_cli("train-demo", tmp_path / "n", "--stage", "upscaler", "--steps", "5"),
                      "--upscaler-steps")
    assert_user_error(run_cli("train-demo", tmp_path / "n", "--upscaler-vae-steps", "0"), "--upscaler-vae-steps 0")
    assert_user_error(run_cli("train-demo", tmp_path / "n", "--stage", "upscaler", "--base", tmp_path),
                      "no tokenizer/")
    assert not (tmp_path / "n").exists()


def test_cli_eval_upscaler_options(demo_fp32, tmp_path):
    assert_user_error(run_cli("eval", demo_fp32, "--noise-level", "5"), "--noise-level", "--upscaler")
    assert_user_error(run_cli("eval", demo_fp32, "--upscaler", tmp_path), "--upscaler", "not an sdrt export")
    assert_user_error(run_cli("eval", demo_fp32, "--upscaler", DEMO_UPSCALER, "--noise-level", "351"),
                      "--noise-level 351")
    assert_user_error(run_cli("eval", demo_fp32, "--upscaler", DEMO_UPSCALER, "--upscaler-steps", "0"),
                      "--upscaler-steps 0")


def test_cli_demo_one_image_out(demo_root, tmp_path):
    """One --prompt with --out: that image alone (no caption strip); bad --out names: one line."""
    from PIL import Image
    p = run_cli("demo", "--dir", demo_root / "sdrt-demo", "--steps", "3", "--no-upscale", "--prompt",
                "a small red circle on a blue background", "--out", tmp_path / "one.png", cwd=demo_root)
    assert p.returncode == 0, p.stderr
    img = Image.open(tmp_path / "one.png")
    assert img.size == (scenes.SIZE, scenes.SIZE)
    assert checker.read(np.asarray(img.convert("RGB"))).background == "blue"
    assert_user_error(run_cli("demo", "--dir", tmp_path / "d", "--prompt", "x", "--out", tmp_path / "one.txt"),
                      "--out")
    assert_user_error(run_cli("demo", "--dir", tmp_path / "d", "--no-upscale", "--steps", "0"), "steps")
    assert not (tmp_path / "d").exists()


# --- the shipped model on sdrt's runtime --------------------------------------------------------

needs_runtime = pytest.mark.skipif(not (runtime_upscales() and (DEMO_UPSCALER / "model_index.json").is_file()),
                                   reason="this runtime runs no x4 upscaler exports, or no shipped upscaler")


@pytest.fixture(scope="session")
def demo_upscaler_fp32(demo_root):
    """The shipped upscaler's FP32 export, where `sdrt demo` makes it."""
    from sdrt.demo import UPSCALER_EXPORT_NAME, demo_export
    return demo_export(demo_root / "sdrt-demo", DEMO_UPSCALER, UPSCALER_EXPORT_NAME)


def diffusers_upscaled(monkeypatch, low, prompt, latents, image_noise, steps, guidance, noise_level):
    """diffusers' StableDiffusionUpscalePipeline on the shipped folder with these latents and image noise."""
    import torch
    from diffusers import StableDiffusionUpscalePipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_upscale as mod
    from PIL import Image
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **kw: torch.from_numpy(image_noise).reshape(shape))
    pipe = StableDiffusionUpscalePipeline.from_pretrained(DEMO_UPSCALER, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=prompt, image=Image.fromarray(low), num_inference_steps=steps, guidance_scale=guidance,
               noise_level=noise_level, latents=torch.from_numpy(latents), output_type="np")
    return (out.images * 255).round().astype(np.uint8)


@needs_runtime
@pytest.mark.parametrize("steps,guidance,noise_level", [(6, 1.0, 20), (4, 4.0, 100)])
def test_shipped_upscaler_sdrt_matches_diffusers(monkeypatch, demo_upscaler_fp32, steps, guidance, noise_level):
    from sdrt.engine.pipeline import Pipeline
    s = scenes.Scene("triangle", "yellow", "black", "large", "top left")
    low = scenes.render(s)
    rng = np.random.default_rng(4)
    latents = rng.standard_normal((1, 4, scenes.SIZE, scenes.SIZE)).astype(np.float32)
    image_noise = rng.standard_normal((1, 3, scenes.SIZE, scenes.SIZE)).astype(np.float32)
    ref = diffusers_upscaled(monkeypatch, low, s.caption, latents, image_noise, steps, guidance, noise_level)
    res = Pipeline(demo_upscaler_fp32, backend="onnxruntime-cpu").generate(
        s.caption, image=low, latents=latents, image_noise=image_noise, steps=steps, guidance=guidance,
        noise_level=noise_level)
    assert res.images.shape == ref.shape == (1, 128, 128, 3)
    assert upscale_eval.psnr(res.images, ref) >= 50, upscale_eval.psnr(res.images, ref)


@needs_runtime
def test_cli_demo_upscales_to_128(demo_root, demo_upscaler_fp32, tmp_path):
    from PIL import Image
    p = run_cli("demo", "--dir", demo_root / "sdrt-demo", "--steps", "5", "--prompt",
                "a large yellow triangle on a black background", "--out", tmp_path / "one.png", cwd=demo_root)
    assert p.returncode == 0, p.stderr
    img = np.asarray(Image.open(tmp_path / "one.png").convert("RGB"))
    assert img.shape == (128, 128, 3)
    assert checker.read(img).background == "black"
    assert "x4 upscaler (32x32 -> 128x128)" in p.stdout and "text to image (32x32)" in p.stdout
