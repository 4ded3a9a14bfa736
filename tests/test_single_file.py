"""`sdrt export MODEL.safetensors|MODEL.ckpt WORK_DIR`: single-file SD 1.x / 2.x checkpoints in the
original LDM layout, converted offline by diffusers' own loaders, give diffusers' images."""
from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest
import torch

import ldm_checkpoint
from conftest import assert_user_error, run_cli
from sdrt import manifest as mf
from sdrt.engine.pipeline import Pipeline
from test_generate import diffusers_images, psnr

# SD's block structure (4 levels, 2 ResBlocks each, attention on the first three), small widths
SD1_SMALL = dict(
    vocab_size=1000, dtype="float32",
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64),
    unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
              block_out_channels=(32, 64, 64, 64),
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
              cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
             block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=32,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4))
# SD 2.x-v: OpenCLIP text encoder (GELU, the layers before the last one), linear projections,
# 64-channel heads, upcast attention, v-prediction, "!" padding
SD2V_SMALL = copy.deepcopy(SD1_SMALL)
SD2V_SMALL["text"].update(hidden_act="gelu", num_hidden_layers=1)
SD2V_SMALL["unet"].update(sample_size=96, block_out_channels=(64, 64, 128, 128), attention_head_dim=[1, 1, 2, 2],
                          use_linear_projection=True, upcast_attention=True)
SD2V_SMALL["vae"].update(sample_size=768)


def write_folder(spec, out, v_prediction=False, pad="<|endoftext|>"):
    from sdrt.export.init_models import SD15_SCHEDULER, pipeline_from_spec
    pipe = pipeline_from_spec(spec, seed=3, scheduler={**SD15_SCHEDULER, "prediction_type":
                                                       "v_prediction" if v_prediction else "epsilon"})
    pipe.tokenizer.pad_token = pad
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """name -> (diffusers folder, .safetensors, .ckpt) for the SD1 and SD2-v layouts."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for name, spec, v, pad in (("sd1", SD1_SMALL, False, "<|endoftext|>"), ("sd2v", SD2V_SMALL, True, "!")):
        folder = write_folder(spec, root / name, v, pad)
        sd = ldm_checkpoint.pipeline_to_ldm(folder, openclip=name == "sd2v")
        files = (root / f"{name}.safetensors", root / f"{name}.ckpt")
        for f in files:
            ldm_checkpoint.save(sd, f)
        out[name] = (folder, *files)
    return out


@pytest.mark.parametrize("name", ["sd1", "sd2v"])
def test_round_trip_through_diffusers_loader(layouts, name, tmp_path):
    """The test's diffusers -> LDM mapping, read back by diffusers' loaders with the configs
    sdrt infers from the shapes, gives the folder's modules weight for weight and its configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdrt.export import single_file
    folder, st, _ = layouts[name]
    found = single_file.to_folder(st, tmp_path / "conv", folder / "tokenizer", say=lambda _: None)
    assert found["family"] == ("sd1" if name == "sd1" else "sd2")
    assert found["prediction_type"] == ("epsilon" if name == "sd1" else "v_prediction")
    for comp, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        a, b = cls.from_pretrained(folder / comp), cls.from_pretrained(tmp_path / "conv" / comp)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), comp
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (comp, k)
        config = a.config.to_dict() if hasattr(a.config, "to_dict") else dict(a.config)
        for key, value in config.items():
            if not key.startswith("_") and key not in ("architectures", "dtype", "torch_dtype", "transformers_version",
                                                              "_name_or_path", "output_hidden_states",
                                                              "pad_token_id"):  # unused by the hidden states
                other = b.config[key] if isinstance(b.config, dict) else getattr(b.config, key)
                same = value == other or list(np.atleast_1d(value)) == list(np.atleast_1d(other))
                assert same, (comp, key, value, other)
    tok = json.loads((tmp_path / "conv" / "tokenizer" / "special_tokens_map.json").read_text()) \
        if (tmp_path / "conv" / "tokenizer" / "special_tokens_map.json").is_file() else \
        json.loads((tmp_path / "conv" / "tokenizer" / "tokenizer_config.json").read_text())
    assert "!" in json.dumps(tok["pad_token"]) if name == "sd2v" else "endoftext" in json.dumps(tok["pad_token"])


@pytest.mark.parametrize("name,fmt", [("sd1", ".safetensors"), ("sd2v", ".ckpt")])
def test_single_file_export_matches_diffusers(layouts, name, fmt, tmp_path):
    """Exported offline (sockets blocked), the checkpoint gives the folder's diffusers image. The
    other format of each layout converts to the same weights (test_both_formats_convert_alike)."""
    folder, st, ckpt = layouts[name]
    f = st if fmt == ".safetensors" else ckpt
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import socket\n"
        "def _no(*a, **k):\n    raise OSError('network access attempted')\n"
        "socket.socket.connect = _no\nsocket.create_connection = _no\nsocket.getaddrinfo = _no\n")
    lat = np.random.default_rng(5).standard_normal((1, 4, 5, 6)).astype(np.float32)
    ref = diffusers_images(folder, "a red fox", "blurry", 6, 7.5, 40, 48, lat)
    work = tmp_path / "work"
    p = run_cli("export", f, work, "--precision", "fp32", "--tokenizer", folder / "tokenizer",
                env={"PYTHONPATH": str(block)})
    assert p.returncode == 0, p.stderr
    detected = [line for line in p.stderr.splitlines() if line.startswith("detected")]
    assert len(detected) == 1 and ("SD 1.x" if name == "sd1" else "SD 2.x") in detected[0], p.stderr
    assert ("v_prediction" if name == "sd2v" else "epsilon") in detected[0]
    assert "network access attempted" not in p.stderr
    data = mf.load(work)
    assert data["source"]["single_file"]["family"] == ("sd1" if name == "sd1" else "sd2")
    assert data["source"]["sha256"]["file"] == mf.sha256_file(f)
    res = Pipeline(work, "onnxruntime-cpu").generate("a red fox", negative="blurry", steps=6,
                                                     latents=lat, height=40, width=48)
    assert psnr(res.images, ref) >= 50, (f.name, psnr(res.images, ref))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block", "work"]     # conversion removed


@pytest.mark.parametrize("name", ["sd1", "sd2v"])
def test_both_formats_convert_alike(layouts, name, tmp_path):
    """.safetensors and .ckpt of one model give the same diffusers folder, weight for weight."""
    from safetensors.torch import load_file

    from sdrt.export import single_file
    folder, st, ckpt = layouts[name]
    for f in (st, ckpt):
        single_file.to_folder(f, tmp_path / f.suffix[1:], folder / "tokenizer", say=lambda _: None)
    for comp in ("unet", "vae", "text_encoder"):
        a = load_file(str(next((tmp_path / "safetensors" / comp).glob("*.safetensors"))))
        b = load_file(str(next((tmp_path / "ckpt" / comp).glob("*.safetensors"))))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), comp


def _edited(layouts, tmp_path, edit, suffix=".safetensors"):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(layouts["sd1"][1]))
    edit(sd)
    path = tmp_path / f"model{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, str(path))
    return path


class RunsCode:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_bad_single_files(layouts, tmp_path):
    folder, st, _ = layouts["sd1"]
    tok = ["--tokenizer", folder / "tokenizer"]
    work = tmp_path / "work"

    def refused(path, *words, extra=()):
        assert_user_error(run_cli("export", path, work, *tok, *extra, cwd=tmp_path), *words)
        assert not work.exists() and not any(p.name.startswith(".work") for p in tmp_path.iterdir())

    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    refused(tmp_path / "other.safetensors", "not a stable diffusion checkpoint", "model.diffusion_model")
    (tmp_path / "cut.safetensors").write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    refused(tmp_path / "cut.safetensors", "truncated")
    (tmp_path / "notes.ckpt").write_text("these are my notes\n")
    refused(tmp_path / "notes.ckpt", "not a readable .ckpt")
    (tmp_path / "notes.safetensors").write_text("these are my notes\n")
    refused(tmp_path / "notes.safetensors", "not a readable .safetensors")
    with open(tmp_path / "evil.ckpt", "wb") as f:
        torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": RunsCode()}, f)
    refused(tmp_path / "evil.ckpt", "could run code", "refused")
    assert not (tmp_path / "PWNED").exists()
    refused(_edited(layouts, tmp_path, lambda sd: sd.update({"conditioner.embedders.1.model.ln_final.weight":
                                                             torch.zeros(4)})), "sdxl", "not supported")
    refused(_edited(layouts, tmp_path, lambda sd: sd.update({"model.diffusion_model.joint_blocks.0.x":
                                                             torch.zeros(4)})), "sd3", "not supported")

    def inpaint(sd):
        w = sd["model.diffusion_model.input_blocks.0.0.weight"]
        sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([w, w, w[:, :1]], 1)
    refused(_edited(layouts, tmp_path, inpaint), "inpainting", "9 input channels")
    refused(st, "--config sd2", "clip", extra=("--config", "sd2"))
    refused(st, "unknown --config", extra=("--config", "sdxl"))


def test_missing_tokenizer_says_how(layouts, tmp_path):
    _, st, _ = layouts["sd1"]
    p = run_cli("export", st, tmp_path / "work", env={"HF_HOME": str(tmp_path / "empty-hf-home")})
    assert_user_error(p, "no tokenizer", "--tokenizer")
    assert not (tmp_path / "work").exists()


def test_wrong_tokenizer_folder_is_refused(layouts, tiny_dir, tmp_path):
    """A missing, empty or foreign --tokenizer folder: one line, nothing written (transformers
    alone turns an empty folder into a 2-token tokenizer: every prompt, the same image)."""
    _, st, _ = layouts["sd1"]
    (tmp_path / "empty").mkdir()
    from sdrt.engine.tokenizer import ClipTokenizer
    assert ClipTokenizer.from_dir(tiny_dir / "tokenizer").backend.get_vocab_size(True) == 1000 == SD1_SMALL["vocab_size"]
    from sdrt.demo import DEMO_MODEL                     # a real tokenizer of another size (600)
    for tok, words in ((tmp_path / "typo", ("not a folder",)), (tmp_path / "empty", ("no tokenizer",)),
                       (DEMO_MODEL / "tokenizer", ("600 tokens", "1000"))):
        p = run_cli("export", st, tmp_path / "work", "--tokenizer", tok)
        assert_user_error(p, "--tokenizer", *words)
        assert not (tmp_path / "work").exists()


def test_folder_tokenizer_must_fit_the_text_encoder(tiny_dir, tmp_path):
    import shutil

    from sdrt.demo import DEMO_MODEL
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    shutil.rmtree(model / "tokenizer")
    shutil.copytree(DEMO_MODEL / "tokenizer", model / "tokenizer")
    assert_user_error(run_cli("export", model, tmp_path / "w"), "600 tokens", "1000")
    assert not (tmp_path / "w").exists()


def test_folder_rejects_single_file_options(tiny_dir, tmp_path):
    assert_user_error(run_cli("export", tiny_dir, tmp_path / "w", "--config", "sd1"), "single-file")
