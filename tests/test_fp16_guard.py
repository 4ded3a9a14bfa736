"""FP16 that fails loudly: a VAE that overflows FP16 on real latents (not on the export's random
validation inputs) is caught at generate, and --vae-precision fp32 fixes it."""
from __future__ import annotations

import importlib.util
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


@pytest.fixture(scope="module")
def mixed(hot_vae, tmp_path_factory):
    """FP16 export with the VAE decoder and the text encoder in FP32."""
    work = tmp_path_factory.mktemp("mixed") / "work"
    p = run_cli("export", hot_vae, work, "--precision", "fp16", "--vae-precision", "fp32",
                "--text-encoder-precision", "fp32")
    assert p.returncode == 0, p.stderr
    return work


def test_overflowing_vae_is_caught_and_vae_fp32_fixes_it(hot_vae, mixed, tmp_path):
    fp16 = tmp_path / "fp16"
    p = run_cli("export", hot_vae, fp16, "--precision", "fp16")
    assert p.returncode == 0, p.stderr                 # random-input validation does not see it
    np.save(tmp_path / "lat.npy", big_latents())
    out = tmp_path / "img.png"
    p = run_cli("generate", fp16, "a fox", "--steps", "2", "--height", "64", "--width", "64",
                "--latents", tmp_path / "lat.npy", "--out", out)
    assert_user_error(p, "VAE decoder (fp16)", "NaN", "--vae-precision fp32")
    assert not out.exists()

    data = mf.load(mixed)
    precision = {n: mf.model_precision(data, n) for n in data["models"]}   # written once per model
    assert precision["vae_decoder"] == "fp32" and precision["unet"] == "fp16" == precision["denoise_step_cfg"]
    assert precision["text_encoder"] == "fp32" and "precisions" not in data
    assert mf.precision_label(data) == "fp16 (text_encoder fp32, vae_decoder fp32, vae_encoder fp32)"  # the encoder follows --vae-precision
    res = Pipeline(mixed, "onnxruntime-cpu").generate("a fox", steps=2, latents=big_latents(), height=64, width=64)
    ref = diffusers_images(hot_vae, "a fox", "", 2, 7.5, 64, 64, big_latents())
    assert psnr(res.images, ref) > 30, psnr(res.images, ref)


def test_mixed_precision_graphs_are_typed_per_model(mixed):
    """Each graph is strongly typed in its own precision; the FP32 text encoder hands the FP16
    step graph FP16 embeddings (the contract), so the bound buffer has one dtype."""
    import onnx
    big = lambda name: {t.data_type for t in onnx.load(str(mixed / "onnx" / f"{name}.onnx")).graph.initializer
                        if np.prod(t.dims) >= 256}
    assert big("text_encoder") == big("vae_decoder") == {onnx.TensorProto.FLOAT}
    assert big("unet") == {onnx.TensorProto.FLOAT16}
    models = mf.models(mf.load(mixed))
    assert models["text_encoder"].tensor("text_embeddings").dtype == "float16"
    assert models["denoise_step_cfg"].tensor("text_embeddings").dtype == "float16"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt_rtx not installed")
def test_rtx_builds_mixed_precision_on_cpu(mixed, tmp_path):
    """The RTX builder (CPU) builds the FP32 text encoder and VAE beside the FP16 step graph;
    each engine key records its model's precision."""
    from sdrt.export.build import build
    work = tmp_path / "work"
    shutil.copytree(mixed, work)
    result = build(work, "tensorrt-rtx", height=64, width=64, progress=False)
    assert sorted(result["built"]) == ["denoise_step_cfg", "text_encoder", "vae_decoder", "vae_encoder"]
    keys = {n: e["key"]["options"]["precision"] for n, e in mf.load(work)["engines"]["tensorrt-rtx"].items()}
    assert keys == {"text_encoder": "fp32", "denoise_step_cfg": "fp16", "vae_decoder": "fp32", "vae_encoder": "fp32"}
