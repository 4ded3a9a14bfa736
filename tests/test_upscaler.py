"""The x4 upscaler (StableDiffusionUpscalePipeline) on ONNX Runtime CPU against diffusers' own
pipeline (CPU, FP32), on small random-weight folders unlike sdrt's own shapes and unlike each other
(widths, depths, attention levels, v- and epsilon-prediction, max noise levels).

diffusers gets the same latents (its `latents` argument) and the same low-resolution image noise
(its randn_tensor patched to return ours); everything else is its own code: image processor,
the low-res scheduler's add_noise, the concatenation, class labels, CFG, the sampler, the VAE.
"""
from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, run_cli
from sdrt.engine.pipeline import Pipeline

PROMPT, NEGATIVE = "a sharp photo of a red bicycle", "blurry"
LOW_H, LOW_W = 20, 28                  # the low-resolution image: non-square, multiples of 4

# A: the x4 upscaler's scheduler (DDIM, v-prediction), 3 UNet levels, no attention at the first
# B: epsilon-prediction, 2 UNet levels with attention at the first only, 2 layers per block, a
#    narrower VAE, max noise level 250
SPECS = {
    "v": dict(vocab_size=1000,
              text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=77, hidden_act="gelu", projection_dim=32),
              unet=dict(sample_size=8, in_channels=7, out_channels=4, layers_per_block=1,
                        block_out_channels=(16, 32, 32),
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, num_class_embeds=1000),
              vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32),
                       layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3,
                       up_block_types=("UpDecoderBlock2D",) * 3)),
    "eps": dict(vocab_size=1000,
                text=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=24),
                unet=dict(sample_size=8, in_channels=7, out_channels=4, layers_per_block=2,
                          block_out_channels=(24, 24),
                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                          cross_attention_dim=24, attention_head_dim=6, norm_num_groups=8, num_class_embeds=300),
                vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                         layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3)),
}
MAX_NOISE = {"v": 350, "eps": 250}


def _scheduler(kind: str) -> dict:
    from sdrt.export.upscaler import SCHEDULER
    return {**SCHEDULER, "prediction_type": "v_prediction" if kind == "v" else "epsilon"}


@pytest.fixture(scope="module")
def upscalers(tmp_path_factory) -> dict:
    """{kind: (folder, FP32 export)} for both folders."""
    from sdrt.export.export import export
    from sdrt.export.upscaler import build_pipeline
    root = tmp_path_factory.mktemp("upscalers")
    out = {}
    for i, (kind, spec) in enumerate(SPECS.items()):
        folder = root / kind
        build_pipeline(spec, seed=10 + i, scheduler=_scheduler(kind),
                       max_noise_level=MAX_NOISE[kind]).save_pretrained(folder, safe_serialization=True)
        out[kind] = (folder, export(folder, root / f"{kind}-fp32", precision="fp32"))
    return out


def low_res_image(h=LOW_H, w=LOW_W, seed=0) -> Image.Image:
    """A smooth picture with some structure, RGB."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([255 * x / w, 255 * y / h, 255 * ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (h / 3) ** 2)], -1)
    noise = np.random.default_rng(seed).integers(0, 30, (h, w, 3))
    return Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8))


low_res_image.__test__ = False


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def diffusers_upscale(monkeypatch, folder, image, latents, image_noise, steps, guidance, noise_level,
                      sampler="ddim"):
    import torch
    from diffusers import StableDiffusionUpscalePipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_upscale as mod

    from diffusers_samplers import scheduler_for
    b = len(latents)                   # a batch takes one image per prompt: the same noise for each
    noise = np.repeat(image_noise, b, 0)
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise).reshape(shape))
    pipe = StableDiffusionUpscalePipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.scheduler = scheduler_for(sampler, None, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=[PROMPT] * b, negative_prompt=[NEGATIVE] * b, image=[image] * b, num_inference_steps=steps,
               guidance_scale=guidance, noise_level=noise_level, latents=torch.from_numpy(latents),
               output_type="np")
    return (out.images * 255).round().astype(np.uint8)


def inputs_for(b: int, seed: int = 7):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((b, 4, LOW_H, LOW_W)).astype(np.float32)
    image_noise = rng.standard_normal((1, 3, LOW_H, LOW_W)).astype(np.float32)
    return latents, image_noise


@pytest.mark.parametrize("kind,steps,guidance,noise_level,sampler,batch", [
    ("v", 6, 7.5, 20, "DDIM", 2),          # the defaults' noise level, CFG, a batch
    ("v", 5, 4.0, 117, "Euler", 1),        # Euler: the model-input scale applies to the latents only
    ("eps", 5, 1.0, 250, "DDIM", 1),       # no guidance, the max noise level
])
def test_upscale_matches_diffusers(monkeypatch, upscalers, kind, steps, guidance, noise_level, sampler, batch):
    folder, work = upscalers[kind]
    latents, image_noise = inputs_for(batch)
    ref = diffusers_upscale(monkeypatch, folder, low_res_image(), latents, image_noise, steps, guidance,
                            noise_level, {"DDIM": "ddim", "Euler": "euler"}[sampler])
    pipe = Pipeline(work, backend="onnxruntime-cpu")
    res = pipe.generate(PROMPT, negative=NEGATIVE, steps=steps, guidance=guidance, batch=batch, latents=latents,
                        image=low_res_image(), noise_level=noise_level, image_noise=image_noise, sampler=sampler)
    assert res.images.shape == ref.shape == (batch, 4 * LOW_H, 4 * LOW_W, 3)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)
    # the comparison can fail: the noise level off by one (its class embedding and the image's noise)
    off = pipe.generate(PROMPT, negative=NEGATIVE, steps=steps, guidance=guidance, batch=batch, latents=latents,
                        image=low_res_image(), noise_level=noise_level - 1, image_noise=image_noise, sampler=sampler)
    assert psnr(off.images, ref) < 40, psnr(off.images, ref)


def test_seeded_image_noise_is_reproducible_and_per_sample(upscalers):
    """A seed gives the same image; a list of seeds gives each sample as a batch of one with its seed."""
    pipe = Pipeline(upscalers["eps"][1], backend="onnxruntime-cpu")
    one = pipe.generate(PROMPT, steps=3, image=low_res_image(), seed=5, noise_level=100)
    again = pipe.generate(PROMPT, steps=3, image=low_res_image(), seed=5, noise_level=100)
    pair = pipe.generate(PROMPT, steps=3, image=low_res_image(), seed=[4, 5], noise_level=100)
    np.testing.assert_array_equal(one.images, again.images)
    np.testing.assert_array_equal(pair.images[1], one.images[0])
    assert psnr(pair.images[0], one.images[0]) < 40


@pytest.fixture(scope="module")
def tiny_upscaler_fp16(tmp_path_factory):
    """`sdrt init --arch tiny-upscaler` exported FP16 (each graph validated against torch FP32)."""
    from sdrt.export.export import export
    from sdrt.export.init_models import init
    root = tmp_path_factory.mktemp("tiny-upscaler")
    return export(init(root / "m", "tiny-upscaler"), root / "w", precision="fp16")


def cli(capsys, *args) -> subprocess.CompletedProcess:
    """`sdrt ...` in this interpreter (the bad-input cases: no new process per case)."""
    from sdrt.cli import main
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def test_fp16_export_validates_and_upscales(tiny_upscaler_fp16, tmp_path):
    import json
    manifest = json.loads((tiny_upscaler_fp16 / "manifest.json").read_text())
    assert manifest["upscaler"]["max_noise_level"] == 350
    assert set(manifest["models"]) >= {"denoise_step_upscale", "denoise_step_upscale_cfg"}
    for name in ("unet", "vae_decoder", "denoise_step_upscale_cfg"):
        v = manifest["models"][name]["validation"]
        assert v["rel_l2"] <= v["tolerance"] == 1e-2
    low_res_image().save(tmp_path / "low.png")
    out = tmp_path / "up.png"
    p = run_cli("generate", tiny_upscaler_fp16, "a cat", "--image", tmp_path / "low.png", "--steps", "3",
                "--seed", "1", "--noise-level", "50", "--out", out)
    assert p.returncode == 0, p.stderr
    assert Image.open(out).size == (4 * LOW_W, 4 * LOW_H)


@pytest.mark.parametrize("args,words", [
    ([], ["upscaler", "--image"]),
    (["--image", "low.png", "--noise-level", "351"], ["--noise-level 351", "0..350"]),
    (["--image", "low.png", "--noise-level", "-1"], ["--noise-level -1", "0..350"]),
    (["--image", "low.png", "--mask", "low.png"], ["--mask", "upscaler"]),
    (["--image", "low.png", "--strength", "0.5"], ["--strength", "upscaler"]),
    (["--image", "low.png", "--image-noise", "wrong.npy"], ["--image-noise", "[1, 3, 20, 28]"]),
    (["--image", "low.png", "--height", "20"], ["--height 20", "112x80"]),
    (["--image", "odd.png"], ["--resize", "not a multiple of 4"]),
    (["--noise-level", "5"], ["--noise-level needs --image"]),
])
def test_bad_upscaler_inputs(capsys, tiny_upscaler_fp16, tmp_path, args, words):
    low_res_image().save(tmp_path / "low.png")
    low_res_image(LOW_H + 2, LOW_W).save(tmp_path / "odd.png")
    np.save(tmp_path / "wrong.npy", np.zeros((1, 4, LOW_H, LOW_W), np.float32))
    out = tmp_path / "out" / "o.png"
    p = cli(capsys, "generate", tiny_upscaler_fp16, "x", "--steps", "2", "--out", out,
            *[str(tmp_path / a) if a.endswith((".png", ".npy")) else a for a in args])
    assert_user_error(p, *words)
    assert not (tmp_path / "out").exists()


def test_noise_level_refused_on_other_exports(capsys, tiny_fp32, tmp_path):
    low_res_image(64, 64).save(tmp_path / "in.png")
    p = cli(capsys, "generate", tiny_fp32, "x", "--steps", "2", "--image", tmp_path / "in.png", "--noise-level", "5",
            "--out", tmp_path / "out" / "o.png")
    assert_user_error(p, "--noise-level", "upscaler")


def test_serve_jobs_api_upscales_and_other_routes_refuse(upscalers):
    """POST /v1/jobs with the low-resolution image and noise_level gives what `generate --seed`
    gives; the OpenAI and web-UI routes refuse an upscaler in one line (in process, no socket)."""
    pytest.importorskip("fastapi")
    import base64
    import io

    from fastapi.testclient import TestClient

    from sdrt.serve import server as srv
    work = upscalers["eps"][1]
    app, server = srv.build(work, "onnxruntime-cpu", max_batch=2, warmup=False)
    client = TestClient(app)
    png = io.BytesIO()
    low_res_image().save(png, format="PNG")
    image = base64.b64encode(png.getvalue()).decode()
    info = client.get("/v1/info").json()
    assert info["tasks"] == ["upscale"] and info["noise_level"] == {"min": 0, "max": 250, "default": 20}
    for body, words in (({"prompt": "x"}, "low-resolution image"),
                        ({"prompt": "x", "image": image, "noise_level": 251}, "noise_level: 251 is outside 0..250"),
                        ({"prompt": "x", "image": image, "strength": 0.5}, "strength")):
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 400 and words in r.json()["detail"], r.json()
    r = client.post("/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 400 and "x4 upscaler: POST /v1/jobs" in r.json()["detail"], r.json()
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x"})
    assert r.status_code == 400 and "x4 upscaler: POST /v1/jobs" in r.json()["detail"], r.json()
    r = client.post("/v1/jobs", json={"prompt": PROMPT, "image": image, "noise_level": 60, "seed": 3, "n": 2,
                                      "steps": 3, "guidance_scale": 3.0})
    assert r.status_code == 202, r.json()
    job = server.scheduler.get(r.json()["id"])
    server.worker.start()
    try:
        deadline = time.monotonic() + 300                           # bounded wait
        while not job.done and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.state == "succeeded", job.error
        alone = Pipeline(work, backend="onnxruntime-cpu").generate(PROMPT, steps=3, guidance=3.0, image=low_res_image(),
                                                                  noise_level=60, seed=4, negative="")
        got = np.stack([np.asarray(im) for im in job.images])
        assert got.shape == (2, 4 * LOW_H, 4 * LOW_W, 3)
        np.testing.assert_array_equal(got[1], alone.images[0])      # image k: seed + k, as generate draws it
    finally:
        server.scheduler.drain()
        server.scheduler.stop()
        server.worker.join(10)


def test_bench_against_diffusers_upscale_pipeline(upscalers, tmp_path):
    """`sdrt bench --image` on an upscaler export: the output size is 4x the image, the reference is
    diffusers' StableDiffusionUpscalePipeline with the same latents and image noise (same images)."""
    import json

    from sdrt.benchmarks.bench import bench
    folder, work = upscalers["eps"]
    low_res_image().save(tmp_path / "low.png")
    bench([work], folder, backends="onnxruntime-cpu", steps=2, batches="1", runs=1, warmup=0,
          out=tmp_path / "out", image=tmp_path / "low.png")
    [record] = json.loads(sorted((tmp_path / "out").glob("*.json"))[0].read_text())["records"]
    assert (record["height"], record["width"], record["mode"]) == (4 * LOW_H, 4 * LOW_W, "upscale")
    assert record["psnr_vs_reference"] >= 50 and record["vae_encoder_ms"] is None


def test_memory_estimate_counts_the_4x_decode_and_vae_slices(upscalers):
    """The VAE decode at 4x the latent size is the largest activation; --vae-batch shrinks it."""
    from sdrt.benchmarks.memory import estimate
    work = upscalers["v"][1]
    whole = estimate(work, 4 * 64, 4 * 64, 4)
    sliced = estimate(work, 4 * 64, 4 * 64, 4, vae_batch=1)
    assert whole["step"] == "denoise_step_upscale_cfg" and "vae_encoder" not in whole["models"]
    vae, step = whole["models"]["vae_decoder"], whole["models"][whole["step"]]
    assert vae["activation_bytes"] > step["activation_bytes"] and whole["activation_bytes"] == vae["activation_bytes"]
    assert sliced["models"]["vae_decoder"]["activation_bytes"] * 3 < vae["activation_bytes"]


def test_rtx_engines_build_on_cpu(upscalers, tmp_path):
    """TensorRT-RTX's builder (it needs no GPU) takes the upscale step graph."""
    pytest.importorskip("tensorrt_rtx")
    import json
    import shutil

    from sdrt.export.build import build
    work = shutil.copytree(upscalers["eps"][1], tmp_path / "w")
    build(work, "tensorrt-rtx", height=4 * LOW_H, width=4 * LOW_W)
    engines = json.loads((work / "manifest.json").read_text())["engines"]["tensorrt-rtx"]
    assert set(engines) == {"text_encoder", "denoise_step_upscale_cfg", "vae_decoder"}
    profile = engines["denoise_step_upscale_cfg"]["key"]["profile"]
    assert profile["low_res_image"]["max"] == [1, 3, LOW_H, LOW_W] and profile["class_labels"]["max"] == [2]
