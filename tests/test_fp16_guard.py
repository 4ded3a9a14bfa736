"""FP16 that fails loudly: a VAE that overflows FP16 on real latents (not on the export's random
validation inputs) is caught at generate, and --vae-precision fp32 fixes it."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from sdrt import manifest as mf
from sdrt.engine.pipeline import Pipeline
from test_generate import diffusers_images, psnr

SCALE = 3000.0   # decoder.conv_in: ~2e4 on validation latents (fits FP16), ~1e5+ on denoised ones


@pytest.fixture(scope="module")
def hot_vae(tiny_dir, tmp_path_factory):
    """The tiny folder with its VAE decoder's first conv scaled up: FP32 is unaffected in effect
    (GroupNorm renormalizes), FP16 overflows to inf once the latents are large."""
    from safetensors.torch import load_file, save_file
    root = tmp_path_factory.mktemp("hot")
    model = root / "model"
    shutil.copytree(tiny_dir, model)
    path = next((model / "vae").glob("*.safetensors"))
    sd = load_file(str(path))
    for k in ("decoder.conv_in.weight", "decoder.conv_in.bias"):
        sd[k] = sd[k] * SCALE
    save_file(sd, str(path))
    return model


def big_latents():
    return (3 * np.random.default_rng(4).standard_normal((1, 4, 8, 8))).astype(np.float32)


def test_overflowing_vae_is_caught_and_vae_fp32_fixes_it(hot_vae, tmp_path):
    fp16, mixed = tmp_path / "fp16", tmp_path / "mixed"
    p = run_cli("export", hot_vae, fp16, "--precision", "fp16")
    assert p.returncode == 0, p.stderr                 # random-input validation does not see it
    np.save(tmp_path / "lat.npy", big_latents())
    out = tmp_path / "img.png"
    p = run_cli("generate", fp16, "a fox", "--steps", "2", "--height", "64", "--width", "64",
                "--latents", tmp_path / "lat.npy", "--out", out)
    assert_user_error(p, "VAE decoder (fp16)", "NaN", "--vae-precision fp32")
    assert not out.exists()

    p = run_cli("export", hot_vae, mixed, "--precision", "fp16", "--vae-precision", "fp32")
    assert p.returncode == 0, p.stderr
    data = mf.load(mixed)
    assert data["precisions"]["vae_decoder"] == "fp32" and data["precisions"]["unet"] == "fp16"
    assert data["precisions"]["text_encoder"] == "fp16" and mf.precision_label(data) == "fp16 (vae_decoder fp32)"
    res = Pipeline(mixed, "onnxruntime-cpu").generate("a fox", steps=2, latents=big_latents(), height=64, width=64)
    ref = diffusers_images(hot_vae, "a fox", "", 2, 7.5, 64, 64, big_latents())
    assert psnr(res.images, ref) > 30, psnr(res.images, ref)
