"""ControlNet inside the step graph against diffusers' StableDiffusionControlNetPipeline (one
ControlNet, and two as its MultiControlNetModel) and the ControlNet img2img pipeline: CPU, FP32,
ONNX Runtime, the same latents, on random-weight folders shaped unlike sdrt's own `tiny` (three
UNet levels, two layers per block), with ControlNets whose last convolutions are random (a trained
one starts at zero), strong enough that a scale off by 10 % fails the comparison."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, run_cli
from sdrt.engine.pipeline import Pipeline

H, W = 64, 96
STEPS = 6
PROMPT, NEGATIVE = "a lighthouse on a cliff", "blurry"
SPEC = dict(
    vocab_size=1000,
    text=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32),
    unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, block_out_channels=(16, 16, 16, 16),
             layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4),
    dtype="float32")


def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def control_picture(seed: int) -> Image.Image:
    """An edge-map-like picture: white strokes on black."""
    rng = np.random.default_rng(seed)
    a = np.zeros((H, W), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, H), rng.integers(0, W)
        a[y, max(x - 20, 0):x + 20] = 255
        a[max(y - 15, 0):y + 15, x] = 255
    return Image.fromarray(np.stack([a] * 3, -1))


@pytest.fixture(scope="session")
def cn_folders(tmp_path_factory):
    """(SD folder, [ControlNet folders]) with random weights."""
    from sdrt.export.init_models import pipeline_from_spec, random_controlnet
    root = tmp_path_factory.mktemp("controlnet")
    pipe = pipeline_from_spec(SPEC, seed=5)
    pipe.save_pretrained(root / "sd", safe_serialization=True)
    cns = []
    for k, seed in enumerate((11, 12)):
        random_controlnet(pipe.unet, seed, scale=0.5, embedding_channels=(8, 8, 8, 16)).save_pretrained(
            root / f"cn{k}", safe_serialization=True)
        cns.append(root / f"cn{k}")
    return root / "sd", cns


@pytest.fixture(scope="session")
def cn1_export(cn_folders, tmp_path_factory):
    from sdrt.export.export import export
    sd, cns = cn_folders
    return export(sd, tmp_path_factory.mktemp("work") / "cn1", precision="fp32", controlnets=cns[:1])


@pytest.fixture(scope="session")
def cn2_export(cn_folders, tmp_path_factory):
    from sdrt.export.export import export
    sd, cns = cn_folders
    return export(sd, tmp_path_factory.mktemp("work") / "cn2", precision="fp32", controlnets=cns)


def diffusers_controlnet(sd, cn_dirs, images, noise, scales, windows, init_image=None, strength=None):
    import torch
    from diffusers import (ControlNetModel, DDIMScheduler, StableDiffusionControlNetImg2ImgPipeline,
                           StableDiffusionControlNetPipeline)
    from diffusers.pipelines.controlnet import pipeline_controlnet_img2img as img2img_module
    cns = [ControlNetModel.from_pretrained(d) for d in cn_dirs]
    cls = StableDiffusionControlNetPipeline if init_image is None else StableDiffusionControlNetImg2ImgPipeline
    pipe = cls.from_pretrained(sd, controlnet=cns if len(cns) > 1 else cns[0], safety_checker=None,
                               requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    one = len(cns) == 1
    kw = dict(controlnet_conditioning_scale=scales[0] if one else scales,
              control_guidance_start=[w[0] for w in windows], control_guidance_end=[w[1] for w in windows],
              num_inference_steps=STEPS, guidance_scale=7.5, output_type="np")
    if init_image is None:
        out = pipe(PROMPT, negative_prompt=NEGATIVE, image=images[0] if one else images,
                   latents=torch.from_numpy(noise), **kw)
    else:                                  # the same noise, and the posterior's mean (sdrt's encoder)
        saved = img2img_module.randn_tensor, img2img_module.retrieve_latents
        img2img_module.randn_tensor = lambda shape, **k: torch.from_numpy(noise).reshape(shape)
        img2img_module.retrieve_latents = lambda out, generator=None, sample_mode="sample": out.latent_dist.mode()
        try:
            out = pipe(PROMPT, negative_prompt=NEGATIVE, image=init_image, control_image=images[0] if one else images,
                       strength=strength, **kw)
        finally:
            img2img_module.randn_tensor, img2img_module.retrieve_latents = saved
    return (out.images * 255).round().astype(np.uint8)


def sdrt_controlnet(work, images, noise, scales, windows, **kw):
    p = Pipeline(work, backend="onnxruntime-cpu")
    control = [(im, s, a, b) for im, s, (a, b) in zip(images, scales, windows)]
    return p.generate(PROMPT, negative=NEGATIVE, steps=STEPS, guidance=7.5, latents=noise, control=control,
                      **kw).images


def noise(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 4, H // 8, W // 8)).astype(np.float32)


def test_one_controlnet_matches_diffusers_and_a_scale_off_by_10_percent_does_not(cn_folders, cn1_export):
    sd, cns = cn_folders
    images, scales, windows = [control_picture(1)], [0.9], [(0.0, 0.8)]
    ref = diffusers_controlnet(sd, cns[:1], images, noise(), scales, windows)
    assert psnr(sdrt_controlnet(cn1_export, images, noise(), scales, windows), ref) >= 50
    assert psnr(sdrt_controlnet(cn1_export, images, noise(), [0.99], windows), ref) < 50


def test_two_controlnets_match_multicontrolnet(cn_folders, cn2_export):
    sd, cns = cn_folders
    images, scales, windows = [control_picture(1), control_picture(2)], [0.8, 1.0], [(0.0, 1.0), (0.0, 0.85)]
    ref = diffusers_controlnet(sd, cns, images, noise(3), scales, windows)
    assert psnr(sdrt_controlnet(cn2_export, images, noise(3), scales, windows), ref) >= 50
    for k in (0, 1):                       # either scale 10 % off: a different image
        off = [s * 1.1 if i == k else s for i, s in enumerate(scales)]
        assert psnr(sdrt_controlnet(cn2_export, images, noise(3), off, windows), ref) < 50


def test_controlnet_image_to_image_matches_diffusers(cn_folders, cn1_export):
    sd, cns = cn_folders
    init = Image.fromarray(np.random.default_rng(7).integers(0, 255, (H, W, 3)).astype(np.uint8))
    images, scales, windows = [control_picture(4)], [1.0], [(0.0, 1.0)]
    ref = diffusers_controlnet(sd, cns[:1], images, noise(5), scales, windows, init_image=init, strength=0.7)
    got = sdrt_controlnet(cn1_export, images, noise(5), scales, windows, image=init, strength=0.7)
    assert psnr(got, ref) >= 50


def test_generate_cli_with_control_and_its_errors(cn1_export, tmp_path):
    picture = tmp_path / "edges.png"
    control_picture(1).save(picture)
    out = tmp_path / "out.png"
    base = ["generate", cn1_export, PROMPT, "--steps", "2", "--backend", "onnxruntime-cpu"]
    proc = run_cli(*base, "--control", f"{picture}:0.8:0:0.9", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (W, H)                  # the control image's size
    assert_user_error(run_cli(*base, "--control", picture, "--control", picture, "--out", out),
                      "2 image(s)", "1 ControlNet")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert_user_error(run_cli(*base, "--control", tmp_path / "bad.png", "--out", out), "cannot read control image")
    assert_user_error(run_cli(*base, "--control", f"{picture}:-0.5", "--out", out), "--control", "scale")
    assert_user_error(run_cli(*base, "--control", f"{picture}:1:0.8:0.2", "--out", out), "--control", "window")


def test_control_on_an_export_without_controlnet(tiny_fp32, tmp_path):
    picture = tmp_path / "edges.png"
    control_picture(1).save(picture)
    proc = run_cli("generate", tiny_fp32, PROMPT, "--steps", "1", "--backend", "onnxruntime-cpu",
                   "--control", picture, "--out", tmp_path / "out.png")
    assert_user_error(proc, "without ControlNet", "--controlnet")


def test_controlnet_for_another_base_is_refused(cn_folders, tmp_path):
    """Refused before anything is exported: one line and exit 2 from the CLI (cross-attention
    width), the same UserError from the API (block layout)."""
    from sdrt.errors import UserError
    from sdrt.export.export import export
    from sdrt.export.init_models import pipeline_from_spec, random_controlnet
    sd, _ = cn_folders
    for key, value, words in (("cross_attention_dim", 48, ("cross-attention width 48",)),
                              ("block_out_channels", (16, 32, 64), ("block_out_channels",))):
        spec = {**SPEC, "unet": {**SPEC["unet"], key: value}}
        if key == "cross_attention_dim":
            spec["text"] = {**SPEC["text"], "hidden_size": 48, "projection_dim": 48}
        other = pipeline_from_spec(spec, seed=1).unet
        random_controlnet(other, 1, embedding_channels=(8, 8, 8, 16)).save_pretrained(tmp_path / key)
        work = tmp_path / f"w-{key}"
        if key == "cross_attention_dim":
            proc = run_cli("export", sd, work, "--precision", "fp32", "--controlnet", tmp_path / key)
            assert_user_error(proc, "another base model", *words)
        else:
            with pytest.raises(UserError, match="another base model.*" + words[0]):
                export(sd, work, precision="fp32", controlnets=[tmp_path / key])
        assert not work.exists()


def test_rtx_builds_the_controlnet_step_and_memory_counts_it(cn1_export):
    """The step with a ControlNet parses and builds with TensorRT-RTX (its builder runs on CPU);
    `sdrt memory` sizes the step with the ControlNet (its weights beside the UNet's)."""
    import importlib.util
    from sdrt import manifest as mf
    from sdrt.benchmarks import memory
    man = mf.load(cn1_export)
    assert memory.runtime_models(man)[1] == "denoise_step_control1_cfg"
    est = memory.estimate(cn1_export, H, W, 1, backend="onnxruntime-cpu")
    step = est["models"]["denoise_step_control1_cfg"]
    data = sum((cn1_export / "onnx" / f).stat().st_size for f in ("unet.onnx.data", "controlnet_0.onnx.data"))
    assert step["weights_bytes"] >= data
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("tensorrt_rtx not installed (pip install 'sdrt[tensorrt-rtx]')")
    from sdrt.engine.engine_keys import import_trt
    from sdrt.export import build as B
    backend, trt = import_trt("tensorrt-rtx")
    api = B.builder_api(trt, backend)
    model = mf.models(man)["denoise_step_control1_cfg"]
    cfg = mf.config(man)
    ranges = B.parse_dynamic(None, 1, H, W, cfg.vae_factor)
    profile = B.profile_for(model, ranges, True, cfg.vae_factor, 1, cfg.text_len)
    options = B.model_options(model, {"opt_level": None, "strongly_typed": True, "workspace_mb": None,
                                      "require_user_allocation": api["user_allocation"], "precision": "fp32",
                                      "refit": False}, 1)
    plan, _, _ = B._build_one(trt, api, backend, model, mf.model_files(cn1_export, man, model.name), profile,
                              options, None, False, [])
    assert plan.nbytes > 0


def test_canny_preprocess_is_opencvs_canny(cn1_export, tmp_path):
    """--control-preprocess canny:LOW:HIGH gives the same image as the edge map made by OpenCV
    beforehand (the ControlNet authors' annotator: Canny on the RGB image)."""
    cv2 = pytest.importorskip("cv2")
    photo = Image.fromarray(np.random.default_rng(9).integers(0, 255, (H, W, 3)).astype(np.uint8))
    edges = cv2.Canny(np.asarray(photo), 50, 150)
    p = Pipeline(cn1_export, backend="onnxruntime-cpu")
    kw = dict(steps=2, guidance=7.5, latents=noise(6))
    a = p.generate(PROMPT, control=[photo], control_preprocess="canny:50:150", **kw).images
    b = p.generate(PROMPT, control=[np.repeat(edges[..., None], 3, axis=2)], **kw).images
    assert np.array_equal(a, b)
    c = p.generate(PROMPT, control=[photo], **kw).images
    assert not np.array_equal(a, c)
    photo.save(tmp_path / "photo.png")
    proc = run_cli("generate", cn1_export, PROMPT, "--steps", "1", "--backend", "onnxruntime-cpu", "--control",
                   tmp_path / "photo.png", "--control-preprocess", "sobel", "--out", tmp_path / "o.png")
    assert_user_error(proc, "--control-preprocess", "canny")


def test_control_specs_share_the_file_x_rule(tmp_path):
    """IMAGE[:SCALE[:START:END]] by request.parse_spec (the LoRA/embedding rule), checked once."""
    from sdrt.engine.request import Control, GenerateRequest, RequestError
    odd = tmp_path / "a:0.5"                   # a file whose name ends like a scale stays a path
    odd.write_bytes(b"")
    r = GenerateRequest("x", control=["e.png", "e.png:0.5", "e.png:0.5:0.1:0.9", str(odd), ("d.png", 0.3),
                                      Control("c.png", 2.0, 0.0, 0.5)])
    assert r.control == [Control("e.png"), Control("e.png", 0.5), Control("e.png", 0.5, 0.1, 0.9),
                         Control(str(odd)), Control("d.png", 0.3), Control("c.png", 2.0, 0.0, 0.5)]
    assert [Control("i", 1, 0.1, 0.9).keep(i, 10) for i in range(10)] == [0, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    for bad, words in ((["e.png:-1"], "scale"), (["e.png:11"], "scale"), (["e.png:1:0.5:0.5"], "window"),
                       (["e.png:1:0:1.5"], "window"), ([("e.png", 1, 0)], r"IMAGE\[:SCALE")):
        with pytest.raises(RequestError, match=words) as e:
            GenerateRequest("x", control=bad)
        assert e.value.field == "control"
    with pytest.raises(RequestError) as e:
        GenerateRequest("x", control_preprocess="canny")
    assert e.value.field == "control_preprocess"
