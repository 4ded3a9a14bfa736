"""Textual-inversion embeddings: the numpy readers against torch, images against diffusers'
load_textual_inversion (FP32, ONNX Runtime CPU), and bad files as one-line errors."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from sdrt.engine import embedding_files
from sdrt.engine.pipeline import Pipeline
from sdrt.engine.tokenizer import ClipTokenizer
from sdrt.errors import UserError
from test_generate import psnr

D = 32          # the tiny text encoder's width
H = W = 64


def vectors(n, seed, width=D):
    import torch
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32) * 0.8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of each format: diffusers safetensors (1 vector, [D]), diffusers .bin (bf16), the web
    UI's .pt (3 vectors, a Parameter, with its "name") and its emb_params .safetensors (2, fp16)."""
    import torch
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("embeddings")
    save_file({"<fox-style>": vectors(1, 1)[0]}, d / "learned_embeds.safetensors")
    torch.save({"<cat-toy>": vectors(1, 2).to(torch.bfloat16)}, d / "learned_embeds.bin")
    torch.save({"string_to_token": {"*": 265}, "name": "snowstyle", "step": 500,
                "string_to_param": {"*": torch.nn.Parameter(vectors(3, 3))},
                "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "model"}, d / "web-ui.pt")
    save_file({"emb_params": vectors(2, 4).half()}, d / "moodlight.safetensors")
    return d


PROMPT = "a <fox-style> painting of snowstyle at moodlight with a <cat-toy>"


def diffusers_with_embeddings(model_dir, files, prompt, negative, lat, steps=8):
    import torch
    from test_prompts import diffusers_pipe
    pipe = diffusers_pipe(model_dir)
    # the emb_params file carries no token: diffusers needs it given (sdrt takes the stem)
    pipe.load_textual_inversion([str(files / "moodlight.safetensors"), str(files / "learned_embeds.safetensors"),
                                 str(files / "learned_embeds.bin"), str(files / "web-ui.pt")],
                                token=["moodlight", None, None, None])
    out = pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5,
               height=H, width=W, latents=torch.from_numpy(lat), output_type="np")
    return (out.images * 255).round().astype(np.uint8)


def all_files(files):
    return [files / "learned_embeds.safetensors", files / "learned_embeds.bin", files / "web-ui.pt",
            files / "moodlight.safetensors"]


def test_same_image_as_diffusers_load_textual_inversion(tiny_dir, tiny_fp32, files):
    lat = np.random.default_rng(21).standard_normal((1, 4, H // 8, W // 8)).astype(np.float32)
    ref = diffusers_with_embeddings(tiny_dir, files, PROMPT, "snowstyle, blurry", lat)
    pipe = Pipeline(tiny_fp32, backend="onnxruntime-cpu", embeddings=all_files(files))
    res = pipe.generate(PROMPT, negative="snowstyle, blurry", steps=8, height=H, width=W, latents=lat)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)
    # without the embeddings the same words are ordinary tokens: another image
    plain = Pipeline(tiny_fp32, backend="onnxruntime-cpu").generate(
        PROMPT, negative="snowstyle, blurry", steps=8, height=H, width=W, latents=lat)
    assert psnr(plain.images, res.images) < 40, psnr(plain.images, res.images)
    # per call: the same files given to generate instead of the Pipeline
    again = Pipeline(tiny_fp32, backend="onnxruntime-cpu").generate(
        PROMPT, negative="snowstyle, blurry", steps=8, height=H, width=W, latents=lat,
        embeddings=[str(p) for p in all_files(files)])
    assert np.array_equal(again.images, res.images)


def test_multi_vector_expands_as_diffusers(tiny_fp32, files, tiny_dir):
    from transformers import CLIPTokenizer
    from sdrt.engine.conditioning import Conditioning
    tok = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    for t in ["<fox-style>", "<cat-toy>", "snowstyle", "snowstyle_1", "snowstyle_2", "moodlight", "moodlight_1"]:
        tok.add_tokens(t)
    table = np.load(tiny_fp32 / "token_embedding.npy")
    cond = Conditioning(ClipTokenizer.from_dir(tiny_fp32 / "tokenizer"), table, 77, all_files(files))
    prompt = "Snowstyle snowstyle, moodlight:<cat-toy>"
    expanded = "Snowstyle snowstyle snowstyle_1 snowstyle_2, moodlight moodlight_1:<cat-toy>"
    assert cond.chunks(prompt).ids[0].tolist() == tok(expanded, padding="max_length", max_length=77).input_ids
    ids = cond.chunks("snowstyle a").ids[0]
    e = cond.lookup(ids)
    np.testing.assert_array_equal(e[1:4], embedding_files.load(files / "web-ui.pt").vectors)
    np.testing.assert_array_equal(e[[0, 4, 5, 6]], table[ids[[0, 4, 5, 6]]])   # bos, "a", eos, pad
    assert cond.table is table                                                 # the model's rows, not a copy


def test_token_override_and_defaults(files):
    assert embedding_files.load(files / "learned_embeds.safetensors").token == "<fox-style>"
    assert embedding_files.load(files / "web-ui.pt").token == "snowstyle"
    assert embedding_files.load(files / "moodlight.safetensors").token == "moodlight"     # the stem
    assert embedding_files.load(f"{files / 'web-ui.pt'}:<mine>").token == "<mine>"
    assert embedding_files.load((files / "web-ui.pt", "other")).token == "other"


def test_readers_match_torch(files, tmp_path):
    import torch
    from safetensors.torch import load_file
    for name, key in (("learned_embeds.safetensors", "<fox-style>"), ("moodlight.safetensors", "emb_params")):
        ref = load_file(files / name)[key].float().numpy()
        np.testing.assert_array_equal(embedding_files.read_safetensors(files / name)[key], ref)
    np.testing.assert_array_equal(embedding_files.load(files / "learned_embeds.bin").vectors,
                                  torch.load(files / "learned_embeds.bin", weights_only=True)["<cat-toy>"].float().numpy())
    np.testing.assert_array_equal(embedding_files.load(files / "web-ui.pt").vectors,
                                  torch.load(files / "web-ui.pt", weights_only=True)["string_to_param"]["*"].detach().numpy())
    # strided and offset storages: a transposed view and a slice of a larger tensor
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    torch.save({"t": base.t(), "s": base[2:4, 3:9]}, tmp_path / "views.pt")
    got = embedding_files.read_torch_pickle(tmp_path / "views.pt")
    np.testing.assert_array_equal(got["t"], base.t().numpy())
    np.testing.assert_array_equal(got["s"], base[2:4, 3:9].numpy())


def test_pickle_needing_more_than_weights_only_is_refused(tmp_path):
    import torch
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": vectors(1, 0)}, "name": "x", "extra": argparse.Namespace(a=1)}, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)                   # torch refuses it too
    with pytest.raises(UserError, match="argparse.Namespace"):
        embedding_files.load(path)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    import torch
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("bad")
    save_file({"<narrow>": vectors(2, 5, width=16)}, d / "narrow.safetensors")
    save_file({"<ok>": vectors(1, 6)}, d / "ok.safetensors")
    (d / "junk.pt").write_bytes(b"not a pickle at all")
    (d / "junk.safetensors").write_bytes(b"\xff" * 40)
    torch.save({"<x>": vectors(1, 7), "extra": argparse.Namespace(a=1)}, d / "needs-more.pt")
    torch.save({"a": vectors(1, 8), "b": vectors(1, 9)}, d / "two-keys.bin")
    return d


@pytest.mark.parametrize("spec,words", [
    ("narrow.safetensors", ["width 16", "takes 32"]),
    ("ok.safetensors:a", ["'a'", "already in the tokenizer's vocabulary"]),
    ("junk.pt", ["junk.pt", "unreadable"]),
    ("junk.safetensors", ["junk.safetensors", "unreadable"]),
    ("needs-more.pt", ["argparse.Namespace", "weights_only"]),
    ("missing.pt", ["missing.pt", "no such file"]),
    ("two-keys.bin", ["not a textual-inversion file"]),
])
def test_bad_embedding_is_one_line(tiny_fp32, bad_files, spec, words):
    from sdrt.engine.conditioning import Conditioning
    table = np.load(tiny_fp32 / "token_embedding.npy")
    with pytest.raises(UserError) as e:
        Conditioning(ClipTokenizer.from_dir(tiny_fp32 / "tokenizer"), table, 77, [f"{bad_files}/{spec}"])
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w.lower() in message.lower(), (w, message)


def test_cli_bad_embedding_exits_2(tiny_fp32, bad_files, tmp_path):
    out = tmp_path / "o.png"
    p = run_cli("generate", tiny_fp32, "a fox", "--embedding", bad_files / "narrow.safetensors", "--steps", "2",
                "--height", "64", "--width", "64", "--backend", "onnxruntime-cpu", "--out", out)
    assert_user_error(p, "width 16", "takes 32")
    assert not out.exists()


def test_cli_embeddings_and_same_token_twice(tiny_fp32, files, tmp_path):
    out = tmp_path / "o.png"
    p = run_cli("generate", tiny_fp32, "a <fox-style> with snowstyle", "--embedding", files / "learned_embeds.safetensors",
                "--embedding", f"{files / 'web-ui.pt'}", "--steps", "2", "--height", "64", "--width", "64",
                "--backend", "onnxruntime-cpu", "--out", out)
    assert p.returncode == 0, p.stderr
    assert out.is_file()
    with pytest.raises(UserError, match="same token"):
        Pipeline(tiny_fp32, backend="onnxruntime-cpu",
                 embeddings=[f"{files / 'web-ui.pt'}:tok", (files / "learned_embeds.bin", "tok")])
