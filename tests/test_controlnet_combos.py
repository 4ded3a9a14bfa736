"""ControlNet with the runtime's other features, each against diffusers' StableDiffusionControlNetPipeline
(CPU, FP32, ONNX Runtime, the same latents and per-step noise): a LoRA (diffusers' load_lora_weights on
the UNet and text encoder; the ControlNet is not patched, in either), a prompt longer than 77 tokens
(diffusers fed the same 77-token chunks as prompt_embeds) and the non-DDIM samplers."""
from __future__ import annotations

import numpy as np
import pytest

from diffusers_samplers import feed_noise, scheduler_for
from test_controlnet import (H, NEGATIVE, PROMPT, W, cn1_export, cn_folders, control_picture,  # noqa: F401
                             noise, psnr)
from sdrt.engine.pipeline import Pipeline

STEPS = 5
SCALE, WINDOW = 0.9, (0.0, 0.8)


def reference_pipe(sd, cn_dir, sampler="ddim", schedule=None):
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        sd, controlnet=ControlNetModel.from_pretrained(cn_dir), dtype=torch.float32, safety_checker=None,
        requires_safety_checker=False)
    pipe.scheduler = scheduler_for(sampler, schedule, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, control, eps, z=None, **kw):
    import torch
    kw = {"prompt": PROMPT, "negative_prompt": NEGATIVE, **kw}
    with feed_noise(pipe.scheduler, z if z is not None else np.zeros((STEPS,) + eps.shape, np.float32)):
        out = pipe(image=control, latents=torch.from_numpy(eps), controlnet_conditioning_scale=SCALE,
                   control_guidance_start=WINDOW[0], control_guidance_end=WINDOW[1], num_inference_steps=STEPS,
                   guidance_scale=7.5, output_type="np", **kw)
    return (out.images * 255).round().astype(np.uint8)


def ours(work, control, eps, prompt=PROMPT, negative=NEGATIVE, scale=SCALE, **kw):
    return Pipeline(work, backend="onnxruntime-cpu").generate(
        prompt, negative=negative, steps=STEPS, guidance=7.5, latents=eps, control=[(control, scale, *WINDOW)],
        **kw).images


def test_lora_and_controlnet_match_diffusers(cn_folders, cn1_export, tmp_path):
    from test_lora import _modules, write_peft
    sd, cns = cn_folders
    lora = write_peft(tmp_path / "lora.safetensors", _modules(sd), seed=3)
    pipe = reference_pipe(sd, cns[0])
    pipe.load_lora_weights(str(lora), adapter_name="l0")
    pipe.set_adapters(["l0"], adapter_weights=[0.8])
    control, eps = control_picture(31), noise(31)
    ref = reference(pipe, control, eps)
    got = ours(cn1_export, control, eps, loras=[(lora, 0.8)])
    assert psnr(got, ref) >= 50, psnr(got, ref)
    assert psnr(ours(cn1_export, control, eps, loras=[]), ref) < 50          # the LoRA counts
    assert psnr(ours(cn1_export, control, eps, scale=SCALE * 1.1, loras=[(lora, 0.8)]), ref) < 50


def test_long_prompt_and_controlnet_match_diffusers(cn_folders, cn1_export):
    from test_prompts import LONG, NEGATIVE_LONG, encode, reference_chunks
    sd, cns = cn_folders
    pipe = reference_pipe(sd, cns[0])
    pos, neg = reference_chunks(pipe.tokenizer, LONG), reference_chunks(pipe.tokenizer, NEGATIVE_LONG)
    k = max(len(pos), len(neg))
    assert k >= 2
    control, eps = control_picture(32), noise(32)
    ref = reference(pipe, control, eps, prompt=None, negative_prompt=None, prompt_embeds=encode(pipe, pos, k),
                    negative_prompt_embeds=encode(pipe, neg, k))
    got = ours(cn1_export, control, eps, prompt=LONG, negative=NEGATIVE_LONG)
    assert psnr(got, ref) >= 50, psnr(got, ref)


@pytest.mark.parametrize("sampler,schedule", [("dpmpp_2m", "karras"), ("euler_a", None)])
def test_samplers_and_controlnet_match_diffusers(cn_folders, cn1_export, sampler, schedule):
    sd, cns = cn_folders
    control, eps = control_picture(33), noise(33)
    z = np.random.default_rng(33).standard_normal((STEPS,) + eps.shape).astype(np.float32)
    ref = reference(reference_pipe(sd, cns[0], sampler, schedule), control, eps, z)
    got = ours(cn1_export, control, eps, sampler=sampler, schedule=schedule, noise=z)
    assert psnr(got, ref) >= 50, psnr(got, ref)
    assert psnr(ours(cn1_export, control, eps, scale=SCALE * 1.1, sampler=sampler, schedule=schedule, noise=z),
                ref) < 50


def test_guess_mode_matches_diffusers(cn_folders, cn1_export, tmp_path):
    """guess_mode=True: the ControlNet's residuals reach the conditional half only, residual i of R
    weighted logspace(-1, 0, R)[i] (per-call weights in the step graph: no other graph, no rebuild)."""
    from conftest import assert_user_error, run_cli
    sd, cns = cn_folders
    control, eps = control_picture(35), noise(35)
    ref = reference(reference_pipe(sd, cns[0]), control, eps, guess_mode=True)
    got = ours(cn1_export, control, eps, guess_mode=True)
    assert psnr(got, ref) >= 50, psnr(got, ref)
    assert psnr(ours(cn1_export, control, eps), ref) < 50                  # guess mode counts
    control.save(tmp_path / "edges.png")
    assert_user_error(run_cli("generate", cn1_export, PROMPT, "--steps", "1", "--backend", "onnxruntime-cpu",
                              "--guess-mode", "--out", tmp_path / "o.png"), "--guess-mode", "--control")


def controlnet_to_ldm(cn, up_block_types) -> dict:
    """A diffusers ControlNetModel's weights in the original layout (control_model.*: the UNet
    encoder's LDM names, input_hint_block, zero_convs, middle_block_out), as community checkpoints
    hold them; diffusers' from_single_file reads them back."""
    from ldm_checkpoint import UNET, unet_to_ldm
    state = cn.state_dict()
    shared = {k: v for k, v in state.items() if k.startswith(("conv_in.", "time_embedding.", "down_blocks.",
                                                                "mid_block."))}
    out = {"control_model." + k[len(UNET):]: v
           for k, v in unet_to_ldm(shared, {**dict(cn.config), "up_block_types": up_block_types}).items()}
    e = cn.controlnet_cond_embedding
    named = [(f"input_hint_block.{2 * n}", c) for n, c in enumerate([e.conv_in, *e.blocks, e.conv_out])]
    named += [(f"zero_convs.{i}.0", c) for i, c in enumerate(cn.controlnet_down_blocks)]
    named += [("middle_block_out.0", cn.controlnet_mid_block)]
    for name, conv in named:
        out[f"control_model.{name}.weight"], out[f"control_model.{name}.bias"] = conv.weight, conv.bias
    return {k: v.detach().contiguous() for k, v in out.items()}


def test_single_file_controlnet_checkpoint(cn_folders, tmp_path):
    """--controlnet FILE.safetensors in the original layout: read offline by diffusers'
    ControlNetModel.from_single_file with a config sdrt derives (the base UNet's encoder, the
    checkpoint's conditioning channels): the same config and weights as the folder (so the same
    export); `sdrt export` takes that path for a file, and refuses a file that is no ControlNet."""
    import torch
    from diffusers import ControlNetModel
    from safetensors.torch import save_file
    from conftest import assert_user_error, run_cli
    from sdrt.export import controlnet
    from test_controlnet import SPEC
    sd, cns = cn_folders
    folder = ControlNetModel.from_pretrained(cns[0])
    path = tmp_path / "control_edges.safetensors"
    save_file(controlnet_to_ldm(folder, SPEC["unet"]["up_block_types"]), str(path))
    got = controlnet.load(path, controlnet.read_config(sd / "unet"), 4)
    for key in ("conditioning_embedding_out_channels", "block_out_channels", "cross_attention_dim",
                "attention_head_dim", "layers_per_block", "in_channels"):
        assert tuple(np.atleast_1d(got.config[key])) == tuple(np.atleast_1d(folder.config[key])), key
    want = folder.state_dict()
    assert got.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in got.state_dict().items())
    bad = tmp_path / "not_a_controlnet.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad))
    assert_user_error(run_cli("export", sd, tmp_path / "w2", "--precision", "fp32", "--controlnet", bad),
                      "not a ControlNet checkpoint")
    assert not (tmp_path / "w2").exists()


def test_bench_times_controlnet_against_diffusers_controlnet_pipeline(cn_folders, cn1_export, tmp_path):
    """`sdrt bench --control`: the reference is diffusers' ControlNet pipeline on the ControlNet folder
    the export was made from; the same images (PSNR), denoise timed with the ControlNet in it."""
    import json
    from conftest import assert_user_error, run_cli
    sd, _ = cn_folders
    control_picture(34).save(tmp_path / "edges.png")
    out = tmp_path / "results"
    base = ("bench", cn1_export, "--reference", sd, "--steps", "3", "--batches", "1", "--sizes", f"{H}x{W}",
            "--runs", "1", "--warmup", "0")
    p = run_cli(*base, "--control", f"{tmp_path / 'edges.png'}:0.9:0:0.8", "--out", out)
    assert p.returncode == 0, p.stderr
    [record] = json.loads(sorted(out.glob("*.json"))[0].read_text())["records"]
    assert record["mode"] == "controlnet x1" and record["psnr_vs_reference"] >= 50
    assert record["reference_stages"]["denoise"]["min"] > 0
    assert_user_error(run_cli(*base, "--control", tmp_path / "edges.png", "--control", tmp_path / "edges.png",
                              "--out", tmp_path / "r"), "--control", "1 ControlNet")
    assert_user_error(run_cli(*base, "--control", f"{tmp_path / 'edges.png'}:-1", "--out", tmp_path / "r"),
                      "--control", "scale")
    assert not (tmp_path / "r").exists()
