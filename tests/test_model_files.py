"""Pipeline folders built differently from sdrt's own: non-square sample_size, outdated scheduler
configs, UNet layouts that only take odd latent sizes with explicit upsample sizes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from sdrt import manifest as mf
from sdrt.engine.pipeline import Pipeline
from test_generate import diffusers_images, psnr


def edited_copy(src, dst, **edits):
    """A copy of pipeline folder `src` with keys of its component configs replaced
    (edits: component -> {key: value}); the weights are untouched."""
    shutil.copytree(src, dst)
    for comp, keys in edits.items():
        path = dst / comp / ("scheduler_config.json" if comp == "scheduler" else "config.json")
        path.write_text(json.dumps({**json.loads(path.read_text()), **keys}))
    return dst


@pytest.fixture(scope="module")
def wide_default(tiny_dir, tmp_path_factory):
    """sample_size [8, 12] (diffusers' UNet2DConditionModel takes a list): default 64x96."""
    root = tmp_path_factory.mktemp("wide")
    model = edited_copy(tiny_dir, root / "model", unet={"sample_size": [8, 12]})
    p = run_cli("export", model, root / "work", "--precision", "fp32")
    assert p.returncode == 0, p.stderr
    return model, root / "work"


@pytest.fixture(scope="module")
def old_folder(tiny_dir, tmp_path_factory):
    """An older folder: scheduler without steps_offset=1 / with clip_sample, and a UNet of one
    downsampler whose sample_size // 4 is odd (12), so x2-upsampling sizes would trace even."""
    root = tmp_path_factory.mktemp("old")
    model = edited_copy(tiny_dir, root / "model", unet={"sample_size": 12},
                        scheduler={"steps_offset": 0, "clip_sample": True})
    p = run_cli("export", model, root / "work", "--precision", "fp32")
    return model, root / "work", p


def test_sample_size_list_sets_the_default_size(wide_default):
    model, work = wide_default
    assert mf.config(mf.load(work)).sample_hw == (8, 12)
    lat = np.random.default_rng(0).standard_normal((1, 4, 8, 12)).astype(np.float32)
    ref = diffusers_images(model, "a fox", "", 5, 7.5, None, None, lat)    # diffusers' default size
    res = Pipeline(work, "onnxruntime-cpu").generate("a fox", steps=5, latents=lat)
    assert res.images.shape == ref.shape == (1, 64, 96, 3)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)


def test_outdated_scheduler_is_updated_as_diffusers_does(old_folder):
    model, work, p = old_folder
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "steps_offset=0" in warnings[0] and "clip_sample=true" in warnings[0], p.stderr
    data = mf.load(work)
    assert data["scheduler"]["updated"] == {"steps_offset": [0, 1], "clip_sample": [True, False]}
    written = json.loads((work / "scheduler" / "scheduler_config.json").read_text())
    assert written == data["scheduler"]["config"]
    assert written["steps_offset"] == 1 and written["clip_sample"] is False
    lat = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref = diffusers_images(model, "a fox", "", 10, 7.5, 64, 64, lat)
    res = Pipeline(work, "onnxruntime-cpu").generate("a fox", steps=10, latents=lat, height=64, width=64)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)


def test_odd_latent_size_on_a_one_downsampler_unet(old_folder):
    """72x72 images: 9x9 latents, which the graph only takes with explicit upsample sizes."""
    model, work, p = old_folder
    assert p.returncode == 0, p.stderr
    lat = np.random.default_rng(2).standard_normal((1, 4, 9, 9)).astype(np.float32)
    ref = diffusers_images(model, "a boat", "", 4, 7.5, 72, 72, lat)
    res = Pipeline(work, "onnxruntime-cpu").generate("a boat", steps=4, latents=lat, height=72, width=72)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)
