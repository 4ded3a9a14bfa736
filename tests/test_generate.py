"""The lean runtime on ONNX Runtime CPU against diffusers' own pipeline (CPU)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from sdrt.engine.pipeline import Pipeline


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def diffusers_images(model_dir, prompt, negative, steps, guidance, height, width, latents):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=[prompt] * len(latents), negative_prompt=[negative] * len(latents) if negative else None,
               num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
               latents=torch.from_numpy(latents), output_type="np")
    return (out.images * 255).round().astype(np.uint8)


@pytest.mark.parametrize("steps,guidance", [(12, 7.5), (7, 1.0)])
def test_matches_diffusers(tiny_dir, tiny_fp32, steps, guidance):
    """Batch 2, non-square, negative prompt, from given latents: PSNR >= 50 dB vs diffusers.
    Odd steps exercise the ping-pong hand-off; guidance 1 the conditional-only step graph."""
    h, w = 64, 96
    latents = np.random.default_rng(7).standard_normal((2, 4, h // 8, w // 8)).astype(np.float32)
    prompt, negative = "a watercolor fox in the snow", "blurry, low quality"
    ref = diffusers_images(tiny_dir, prompt, negative, steps, guidance, h, w, latents)
    res = Pipeline(tiny_fp32, backend="onnxruntime-cpu").generate(
        prompt, negative=negative, steps=steps, guidance=guidance, height=h, width=w, batch=2,
        latents=latents)
    assert res.images.shape == ref.shape == (2, h, w, 3)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)
    assert res.images.std() > 1  # not a blank image


def test_timings_and_reuse(tiny_fp32):
    pipe = Pipeline(tiny_fp32, backend="onnxruntime-cpu")
    a = pipe.generate("a cat", steps=5, seed=3, height=64, width=64)
    b = pipe.generate("a cat", steps=5, seed=3, height=64, width=64)   # same plan, same result
    c = pipe.generate("a cat", steps=5, seed=4, height=64, width=64)
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    t = a.timings
    assert len(t["steps_ms"]) == 5 and t["backend"] == "onnxruntime-cpu"
    for k in ("tokenize_ms", "text_encoder_ms", "unet_step_ms", "vae_ms", "total_ms"):
        assert t[k] >= 0
    assert t["total_ms"] >= t["denoise_ms"]
    assert len(pipe.plans) == 1


def test_fp16_export_runs_close_to_fp32(tiny_fp16, tiny_fp32):
    lat = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    a = Pipeline(tiny_fp32, "onnxruntime-cpu").generate("a boat", steps=10, latents=lat, height=64, width=64)
    b = Pipeline(tiny_fp16, "onnxruntime-cpu").generate("a boat", steps=10, latents=lat, height=64, width=64)
    assert psnr(a.images, b.images) > 30


def test_attention_forms_give_the_same_images(tiny_fp32, tiny_fp32_decomposed):
    """ONNX's Attention op computes what torch's MatMul/Softmax/MatMul does (FP32, ORT CPU)."""
    lat = np.random.default_rng(3).standard_normal((1, 4, 8, 12)).astype(np.float32)
    a = Pipeline(tiny_fp32, "onnxruntime-cpu").generate("a lighthouse", steps=6, latents=lat, height=64, width=96)
    b = Pipeline(tiny_fp32_decomposed, "onnxruntime-cpu").generate("a lighthouse", steps=6, latents=lat,
                                                                    height=64, width=96)
    assert psnr(a.images, b.images) >= 50, psnr(a.images, b.images)


def test_ort_fused_variant_matches_plain(tiny_fp16):
    lat = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    fused = Pipeline(tiny_fp16, "onnxruntime-cpu")                       # default: use onnx/ort/
    plain = Pipeline(tiny_fp16, "onnxruntime-cpu", ort_fusion=False)
    assert fused.backend_name == "onnxruntime-cpu+ort-fusion" and plain.backend_name == "onnxruntime-cpu"
    a = fused.generate("a kite", steps=8, latents=lat, height=64, width=64)
    b = plain.generate("a kite", steps=8, latents=lat, height=64, width=64)
    assert psnr(a.images, b.images) > 35


def test_cli_generate_batch_writes_all_images(tiny_fp32, tmp_path):
    out = tmp_path / "img.png"
    p = run_cli("generate", tiny_fp32, "a lighthouse", "--steps", "3", "--batch", "2", "--seed", "1",
                "--height", "64", "--width", "64", "--backend", "onnxruntime-cpu", "--out", out, "--timings")
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == ["img-0.png", "img-1.png"]
    assert "per step" in p.stderr and "total" in p.stderr
    from PIL import Image
    assert Image.open(tmp_path / "img-1.png").size == (64, 64)


def test_runtime_never_imports_torch(tiny_fp32, tmp_path):
    """With torch (and diffusers/transformers) made unimportable, generate still works."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nfor m in ('torch', 'diffusers', 'transformers'):\n    sys.modules[m] = None\n")
    out = tmp_path / "x.png"
    p = run_cli("generate", tiny_fp32, "a tree", "--steps", "2", "--height", "64", "--width", "64",
                "--out", out, env={"PYTHONPATH": str(blocker)})
    assert p.returncode == 0, p.stderr
    assert out.is_file()


@pytest.mark.parametrize("args,words", [
    (["--height", "60"], ["height 60", "multiple of 8"]),
    (["--width", "0"], ["width 0"]),
    (["--steps", "0"], ["steps"]),
    (["--batch", "0"], ["batch"]),
    (["--backend", "tensorrt"], ["tensorrt"]),
    (["--backend", "onnxruntime-cuda"], ["gpu"]),
    (["--backend", "foo"], ["unknown backend 'foo'", "onnxruntime-cpu"]),
])
def test_generate_bad_input(tiny_fp32, tmp_path, args, words):
    out = tmp_path / "o.png"
    p = run_cli("generate", tiny_fp32, "x", "--steps", "2", "--out", out, *args)  # last --steps wins
    assert_user_error(p, *words)
    assert list(tmp_path.iterdir()) == []


def test_generate_bad_latents(tiny_fp32, tmp_path):
    bad = tmp_path / "lat.npy"
    np.save(bad, np.zeros((1, 4, 7, 8), np.float32))
    out = tmp_path / "o.png"
    assert_user_error(run_cli("generate", tiny_fp32, "x", "--steps", "2", "--height", "64", "--width", "64",
                              "--latents", bad, "--out", out), "latents have shape", "[1, 4, 8, 8]")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    assert_user_error(run_cli("generate", tiny_fp32, "x", "--latents", tmp_path / "junk.npy", "--out", out),
                      "cannot read latents")
    assert not out.exists()


def test_generate_missing_or_corrupt_models(tiny_fp32, tmp_path):
    import shutil
    work = tmp_path / "w"
    shutil.copytree(tiny_fp32, work)
    (work / "onnx" / "vae_decoder.onnx").write_bytes(b"garbage")
    out = tmp_path / "o.png"
    assert_user_error(run_cli("generate", work, "x", "--steps", "1", "--height", "64", "--width", "64",
                              "--out", out), "vae_decoder.onnx")
    assert_user_error(run_cli("generate", tmp_path / "nowhere", "x", "--out", out), "not a folder")
    (work / "manifest.json").write_text("{broken")
    assert_user_error(run_cli("generate", work, "x", "--out", out), "corrupt")
    assert not out.exists()


def test_manifest_of_an_older_export_with_scaling_factor_still_loads(tiny_fp32, tmp_path):
    """Exports written before ModelConfig lost scaling_factor (the VAE graph has it folded in)."""
    import json
    import shutil
    work = tmp_path / "old"
    shutil.copytree(tiny_fp32, work)
    man = json.loads((work / "manifest.json").read_text())
    assert "scaling_factor" not in man["config"]
    man["config"]["scaling_factor"] = 0.18215
    (work / "manifest.json").write_text(json.dumps(man))
    lat = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    old = Pipeline(work, "onnxruntime-cpu").generate("a boat", steps=2, latents=lat, height=64, width=64)
    new = Pipeline(tiny_fp32, "onnxruntime-cpu").generate("a boat", steps=2, latents=lat, height=64, width=64)
    assert np.array_equal(old.images, new.images)
