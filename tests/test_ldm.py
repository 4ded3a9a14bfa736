"""The latent-diffusion members without a text encoder, and class-conditional UNets, against diffusers
(FP32, ONNX Runtime CPU, PSNR >= 50 dB on the uint8 images), on small random-weight folders shaped
unlike sdrt's own `init` archs (other widths, depths, attention levels, VQ codebooks, factors):

  unconditional LDM      LDMPipeline (UNet2DModel + VQModel), ε-prediction, DDIM
  LDM super-resolution   LDMSuperResolutionPipeline, v-prediction, DDIM and Euler (the sampler's
                         input scale applies to the concatenated image, as diffusers')
  class-conditional      diffusers' components (no pipeline has class labels): UNet2DModel with a
                         null class and guidance against it; UNet2DConditionModel (SD layout, text +
                         class, no null class)

Each comparison also fails on a wrong input (other latents, another low-resolution image, another
class label), so a test that cannot tell them apart would fail.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_user_error, run_cli

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

STEPS = 4


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def to_uint8(x) -> np.ndarray:
    """diffusers' output_type="np" ([0, 1] NHWC) -> uint8 as numpy_to_pil rounds it."""
    return (np.asarray(x) * 255).round().astype(np.uint8)


def scheduler(prediction_type: str = "epsilon"):
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.001, beta_end=0.02,
                                   beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                                   steps_offset=1, prediction_type=prediction_type)


def unet_2d(in_channels, out_channels, blocks, attention_level, **kw):
    down = tuple("AttnDownBlock2D" if i == attention_level else "DownBlock2D" for i in range(len(blocks)))
    up = tuple(reversed(tuple(d.replace("Down", "Up") for d in down)))
    return diffusers.UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=out_channels,
                                 block_out_channels=blocks, down_block_types=down, up_block_types=up,
                                 norm_num_groups=8, attention_head_dim=4, **kw).eval()


def vq(blocks, latent_channels, codes, scaling_factor=0.5):
    from sdrt.export.ldm import random_vq
    return random_vq(dict(block_out_channels=blocks, latent_channels=latent_channels, num_vq_embeddings=codes,
                          norm_num_groups=8, layers_per_block=1, scaling_factor=scaling_factor,
                          down_block_types=("DownEncoderBlock2D",) * len(blocks),
                          up_block_types=("UpDecoderBlock2D",) * len(blocks)), seed=3)


def export_fp32(folder, out):
    from sdrt.export.export import export
    return export(folder, out, precision="fp32")


def sdrt_images(work, steps=STEPS, **kw) -> np.ndarray:
    from sdrt.engine.pipeline import Pipeline
    return Pipeline(work, backend="onnxruntime-cpu").generate(steps=steps, **kw).images


def randn(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---- unconditional (LDMPipeline) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def uncond(tmp_path_factory):
    """UNet2DModel of three levels (16, 32, 32), attention in the middle one, two layers per block;
    VQ factor 2, 4 latent channels, 32 codes, scaling factor 0.5."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ldm") / "uncond"
    pipe = diffusers.LDMPipeline(vqvae=vq((16, 32), 4, 32), unet=unet_2d(4, 4, (16, 32, 32), 1, layers_per_block=2),
                                 scheduler=scheduler())
    pipe.save_pretrained(folder)
    return folder, export_fp32(folder, folder.parent / "uncond-work")


def test_unconditional_matches_ldm_pipeline(uncond):
    folder, work = uncond
    pipe = diffusers.LDMPipeline.from_pretrained(folder)
    ref = to_uint8(pipe(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7),
                        output_type="np").images)
    latents = randn((2, 4, 8, 8), 7).numpy()
    got = sdrt_images(work, latents=latents, batch=2)
    assert got.shape == ref.shape == (2, 16, 16, 3)
    assert psnr(got, ref) >= 50
    assert psnr(sdrt_images(work, latents=latents * 1.05, batch=2), ref) < 50    # other noise: another image


def test_fp16_export_validates_and_keeps_the_quantisation_in_fp32(uncond, tmp_path):
    """FP16: the UNet2DModel and the VQ decoder validate within FP16's tolerance; the codebook and
    the nearest-code search stay FP32, so the FP16 image stays near the FP32 one."""
    from sdrt import manifest as mf
    from sdrt.export.export import export
    folder, work32 = uncond
    work = export(folder, tmp_path / "fp16", precision="fp16")
    man = mf.load(work)
    assert {n: r["precision"] for n, r in man["models"].items()} == {"unet": "fp16", "vae_decoder": "fp16",
                                                                     "denoise_step": "fp16"}
    assert all(r["validation"]["rel_l2"] < 1e-2 for r in man["models"].values())
    latents = randn((1, 4, 8, 8), 9).numpy()
    assert psnr(sdrt_images(work, latents=latents), sdrt_images(work32, latents=latents)) >= 30


def test_unconditional_bad_inputs(uncond):
    _, work = uncond
    assert_user_error(run_cli("generate", work, "a cat", "--steps", "1"), "no text encoder", "PROMPT")
    assert_user_error(run_cli("generate", work, "--class-label", "1", "--steps", "1"), "--class-label")
    assert_user_error(run_cli("generate", work, "--height", "20", "--steps", "1"), "--height", "multiple of 8")
    assert_user_error(run_cli("bench", work, "--no-reference"), "no text encoder")
    from sdrt.engine.request import RequestError
    with pytest.raises(RequestError, match="no text encoder") as e:
        sdrt_images(work, prompt="a cat")
    assert e.value.field == "prompt"


def test_unconditional_cli_seed(uncond, tmp_path):
    _, work = uncond
    proc = run_cli("generate", work, "--seed", "3", "--steps", "2", "--batch", "2", "--out", tmp_path / "u.png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "u-0.png").is_file() and (tmp_path / "u-1.png").is_file()


# ---- super-resolution (LDMSuperResolutionPipeline) ---------------------------------------------------

@pytest.fixture(scope="module")
def superres(tmp_path_factory):
    """UNet2DModel (24, 48) with attention on the first level, 6 channels in (3 latent + the image),
    v-prediction; VQ factor 4, 3 latent channels, 16 codes."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("ldm") / "superres"
    pipe = diffusers.LDMSuperResolutionPipeline(vqvae=vq((16, 16, 16), 3, 16, scaling_factor=1.0),
                                                unet=unet_2d(6, 3, (24, 48), 0, layers_per_block=1),
                                                scheduler=scheduler("v_prediction"))
    pipe.save_pretrained(folder)
    return folder, export_fp32(folder, folder.parent / "superres-work")


def low_res(seed=0):
    from PIL import Image
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("sampler", ["DDIM", "Euler"])
def test_superres_matches_ldm_sr_pipeline(superres, sampler):
    folder, work = superres
    pipe = diffusers.LDMSuperResolutionPipeline.from_pretrained(folder)
    if sampler == "Euler":
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    image = low_res()
    ref = to_uint8(pipe(image, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(5),
                        output_type="np").images)
    latents = randn((1, 3, 32, 32), 5).numpy()
    got = sdrt_images(work, image=image, latents=latents, sampler=sampler)
    assert got.shape == ref.shape == (1, 128, 128, 3)                 # the latent size x the VQ factor
    assert psnr(got, ref) >= 50
    if sampler == "DDIM":                                              # another low-resolution image
        assert psnr(sdrt_images(work, image=low_res(1), latents=latents), ref) < 50


def test_superres_bad_inputs(superres, tmp_path):
    _, work = superres
    assert_user_error(run_cli("generate", work, "--steps", "1"), "--image", "low-resolution")
    low_res().save(tmp_path / "low.png")
    assert_user_error(run_cli("generate", work, "--image", tmp_path / "low.png", "--height", "64", "--steps", "1"),
                      "--height 64", "128x128")
    from PIL import Image
    Image.new("RGB", (31, 32)).save(tmp_path / "odd.png")
    assert_user_error(run_cli("generate", work, "--image", tmp_path / "odd.png", "--steps", "1"), "multiple", "--resize")


# ---- class-conditional ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def class_uncond(tmp_path_factory):
    """UNet2DModel (16, 32) of 5 classes + the null class (unet/config.json "null_class": true)."""
    from sdrt.export.ldm import mark_null_class
    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("ldm") / "class"
    unet = unet_2d(4, 4, (16, 32), 1, layers_per_block=1, num_class_embeds=6)
    with torch.no_grad():                     # a class table that matters next to the time embedding
        unet.class_embedding.weight.normal_(0, 1)
    diffusers.LDMPipeline(vqvae=vq((16, 32), 4, 32), unet=unet, scheduler=scheduler()).save_pretrained(folder)
    mark_null_class(folder)
    return folder, export_fp32(folder, folder.parent / "class-work")


def component_loop(folder, latents, labels, guidance):
    """diffusers' own UNet2DModel (class_labels), DDIMScheduler and VQModel, as LDMPipeline runs them,
    with classifier-free guidance against the null class (the last class row)."""
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    vqvae = diffusers.VQModel.from_pretrained(folder / "vqvae").eval()
    sched = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    sched.set_timesteps(STEPS)
    x = torch.from_numpy(latents)
    c = torch.tensor(labels)
    null = torch.full_like(c, unet.config.num_class_embeds - 1)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(torch.cat([x, x]), t, class_labels=torch.cat([null, c])).sample
            uncond, cond = eps.chunk(2)
            x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        image = vqvae.decode(x / vqvae.config.scaling_factor).sample
    return to_uint8((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())


def test_class_conditional_unet2d_matches_components(class_uncond):
    folder, work = class_uncond
    latents = randn((2, 4, 8, 8), 11).numpy()
    ref = component_loop(folder, latents, [1, 4], 3.0)
    assert psnr(sdrt_images(work, latents=latents, batch=2, class_label=[1, 4], guidance=3.0), ref) >= 50
    assert psnr(sdrt_images(work, latents=latents, batch=2, class_label=[1, 3], guidance=3.0), ref) < 50


def test_class_conditional_bad_inputs(class_uncond):
    _, work = class_uncond
    assert_user_error(run_cli("generate", work, "--class-label", "5", "--steps", "1"), "out of range", "0..4")
    assert_user_error(run_cli("generate", work, "--steps", "1"), "--class-label")
    assert_user_error(run_cli("generate", work, "--class-label", "-1", "--steps", "1"), "--class-label")


def test_class_conditional_sd_layout_matches_diffusers(tmp_path):
    """UNet2DConditionModel with a class table of 5 (no null class: both CFG rows get the class) in a
    StableDiffusionPipeline folder; diffusers' pipeline with its UNet given the class labels."""
    from sdrt.export.init_models import ARCHS, pipeline_from_spec
    spec = dict(ARCHS["tiny"])
    spec["unet"] = {**spec["unet"], "num_class_embeds": 5, "block_out_channels": (32, 32),
                    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
                    "norm_num_groups": 8}     # (one channel per group would normalise the class embedding away)
    pipe = pipeline_from_spec(spec, seed=4)
    with torch.no_grad():
        pipe.unet.class_embedding.weight.normal_(0, 1)
    pipe.save_pretrained(tmp_path / "sd")
    work = export_fp32(tmp_path / "sd", tmp_path / "sd-work")
    from sdrt.engine.request import RequestError
    with pytest.raises(RequestError, match="text-to-image model: give a prompt"):
        sdrt_images(work, class_label=3)
    forward = pipe.unet.forward
    pipe.unet.forward = lambda *a, **k: forward(*a, **k, class_labels=torch.tensor([3, 3]))
    latents = randn((1, 4, 8, 8), 2).numpy()
    ref = to_uint8(pipe("a red square", num_inference_steps=STEPS, guidance_scale=5.0,
                        latents=torch.from_numpy(latents), output_type="np").images)
    got = sdrt_images(work, prompt="a red square", latents=latents, class_label=3, guidance=5.0,
                      prompt_syntax="plain")
    assert psnr(got, ref) >= 50
    assert psnr(sdrt_images(work, prompt="a red square", latents=latents, class_label=2, guidance=5.0,
                            prompt_syntax="plain"), ref) < 50


# ---- the server ----------------------------------------------------------------------------------

def test_server_jobs_run_an_unconditional_model_and_refuse_the_others(uncond, class_uncond, superres):
    """The jobs API runs an unconditional LDM (an empty prompt: the same image as Pipeline.generate
    with that seed); a prompt fails its job naming the field; class-conditional and
    super-resolution exports, and --batching step without text, are refused at start in one line."""
    pytest.importorskip("fastapi")
    import time

    from sdrt.errors import UserError
    from sdrt.serve import server as srv
    from sdrt.serve import spec as sp
    _, work = uncond
    app, server = srv.build(work, "onnxruntime-cpu", max_batch=2, warmup=False)
    sched = server.scheduler
    jobs = [sched.submit(sp.make(server.limits, prompt=p, steps=3, seed=4, width=16, height=16)) for p in ("", "a cat")]
    server.worker.start()
    try:
        deadline = time.monotonic() + 120
        while not all(j.done for j in jobs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [j.state for j in jobs] == ["succeeded", "failed"], [j.error for j in jobs]
        assert "no text encoder" in jobs[1].error and jobs[1].error_status == 400
        want = sdrt_images(work, steps=3, seed=4, height=16, width=16)
        assert psnr(np.asarray(jobs[0].images[0]), want[0]) == float("inf")
    finally:
        sched.drain()
        sched.stop()
        server.worker.join(10)
    for w, what in ((class_uncond[1], "class-conditional"), (superres[1], "super-resolution")):
        with pytest.raises(UserError, match=what):
            srv.build(w, "onnxruntime-cpu", warmup=False)
    with pytest.raises(UserError, match="--batching step"):
        srv.build(work, "onnxruntime-cpu", batching="step", warmup=False)


# ---- engines -------------------------------------------------------------------------------------

def test_tensorrt_rtx_builds_the_ldm_exports_on_cpu(uncond, superres, class_uncond, tmp_path):
    """`sdrt build` on each member (TensorRT-RTX's builder runs on a CPU): the step graph its task
    runs (the guided one where there is a null class) and the VQ decoder; no text encoder."""
    import importlib.util
    import shutil
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("tensorrt_rtx not installed (pip install 'sdrt[tensorrt-rtx]')")
    from sdrt.export import build as B
    want = {"uncond": ["denoise_step", "vae_decoder"], "superres": ["denoise_step_superres", "vae_decoder"],
            "class": ["denoise_step_cfg", "vae_decoder"]}
    for name, (_, work) in (("uncond", uncond), ("superres", superres), ("class", class_uncond)):
        copy = tmp_path / name
        shutil.copytree(work, copy)              # the module's exports stay engine-free
        assert sorted(B.build(copy, "tensorrt-rtx", progress=False)["built"]) == want[name]
