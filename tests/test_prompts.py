"""Long prompts (77-token chunks), emphasis and clip skip on ONNX Runtime CPU, against diffusers fed
prompt_embeds / negative_prompt_embeds that this test builds itself with transformers (FP32)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from sdrt.engine.conditioning import Conditioning, emphasize
from sdrt.engine.pipeline import Pipeline
from sdrt.engine.tokenizer import ClipTokenizer
from test_generate import psnr

LONG = ("a watercolor painting of a red fox sleeping in deep snow under tall pine trees at dawn, "
        "soft golden light, mist between the trunks, tiny snowflakes drifting, " * 4).strip()
NEGATIVE_LONG = "blurry, low quality, jpeg artifacts, " * 12
H = W = 64


def diffusers_pipe(model_dir):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def torch_parts(tiny_dir):
    """transformers' tokenizer and text encoder, and diffusers' pipeline (DDIM) of the tiny model."""
    return diffusers_pipe(tiny_dir)


@pytest.fixture(scope="session")
def biased_dir(tiny_dir, tmp_path_factory):
    """The tiny model with a trained-like final layer norm (a bias of mean 0.3). Emphasis divides by
    the mean of each chunk's encoder output; with random init's zero bias that mean is ~0 and the
    ratio is noise (trained CLIPs have a bias, so the web UI's rule is well defined there)."""
    import shutil

    import torch
    from transformers import CLIPTextModel
    out = tmp_path_factory.mktemp("models") / "tiny-biased"
    shutil.copytree(tiny_dir, out)
    te = CLIPTextModel.from_pretrained(out / "text_encoder")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        te.final_layer_norm.bias.copy_(0.3 + 0.3 * torch.randn(te.final_layer_norm.bias.shape, generator=g))
    te.save_pretrained(out / "text_encoder")
    return out


@pytest.fixture(scope="session")
def biased_fp32(biased_dir, tmp_path_factory):
    from sdrt.export.export import export
    return export(biased_dir, tmp_path_factory.mktemp("work") / "tiny-biased-fp32", precision="fp32")


@pytest.fixture(scope="module")
def biased_torch(biased_dir):
    return diffusers_pipe(biased_dir)


def reference_chunks(tok, prompt: str) -> list[list[int]]:
    """The prompt's tokens cut into 75s, each [bos, ..., eos, pad...] (written independently of sdrt)."""
    ids = tok(prompt, add_special_tokens=False).input_ids
    bodies = [ids[i:i + 75] for i in range(0, len(ids), 75)] or [[]]
    return [[tok.bos_token_id, *b, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(b)) for b in bodies]


def encode(pipe, chunks: list[list[int]], k: int, clip_skip: int = 1, weights=None):
    """[1, 77 k, D]: each chunk through CLIP, final layer norm on the hidden state clip_skip layers from
    the top; missing chunks are the empty prompt's; optional per-token weights with the web UI's
    mean restoration per chunk."""
    import torch
    empty = reference_chunks(pipe.tokenizer, "")
    chunks = chunks + empty * (k - len(chunks))
    te = pipe.text_encoder
    with torch.no_grad():
        out = te(torch.tensor(chunks), output_hidden_states=True)
        z = te.final_layer_norm(out.hidden_states[-clip_skip])          # [k, 77, D]
        if weights is not None:
            w = torch.tensor(weights, dtype=torch.float32)[..., None]
            mean = z.mean(dim=(1, 2), keepdim=True)
            zw = z * w
            z = zw * (mean / zw.mean(dim=(1, 2), keepdim=True))
    return z.reshape(1, -1, z.shape[-1])


def diffusers_from_embeds(pipe, cond, uncond, latents, steps=8, guidance=7.5):
    import torch
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
               guidance_scale=guidance, height=H, width=W, latents=torch.from_numpy(latents), output_type="np")
    return (out.images * 255).round().astype(np.uint8)


def latents(seed=5):
    return np.random.default_rng(seed).standard_normal((1, 4, H // 8, W // 8)).astype(np.float32)


@pytest.fixture(scope="module")
def pipe32(tiny_fp32):
    return Pipeline(tiny_fp32, backend="onnxruntime-cpu")


# ---- chunks -----------------------------------------------------------------------------------

def test_short_prompt_is_one_chunk_as_transformers_tokenizes(tiny_fp32, torch_parts):
    cond = Conditioning(ClipTokenizer.from_dir(tiny_fp32 / "tokenizer"), np.zeros((1000, 32), np.float32), 77)
    for prompt in ("a red fox", "", "A  Fox, in the snow!"):
        c = cond.chunks(prompt)
        ref = torch_parts.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert c.ids.tolist() == [ref] and (c.weights == 1).all()


def test_long_prompt_chunks_and_negative_padding(tiny_fp32, torch_parts):
    tok = torch_parts.tokenizer
    cond = Conditioning(ClipTokenizer.from_dir(tiny_fp32 / "tokenizer"), np.zeros((1000, 32), np.float32), 77)
    want = reference_chunks(tok, LONG)
    assert len(want) >= 3
    assert cond.chunks(LONG).ids.tolist() == want
    rows = cond.rows(["short", LONG])                       # the short one padded with empty chunks
    k = len(want)
    assert rows.ids.shape == (2 * k, 77)
    assert rows.ids[:k].tolist() == reference_chunks(tok, "short") + reference_chunks(tok, "") * (k - 1)
    assert rows.ids[k:].tolist() == want


def test_break_and_weights_positions(tiny_fp32, torch_parts):
    tok = torch_parts.tokenizer
    cond = Conditioning(ClipTokenizer.from_dir(tiny_fp32 / "tokenizer"), np.zeros((1000, 32), np.float32), 77)
    c = cond.chunks("a fox BREAK (snow:1.5) [tree]")
    assert c.ids.tolist() == reference_chunks(tok, "a fox") + reference_chunks(tok, "snow tree")
    n_snow = len(tok("snow", add_special_tokens=False).input_ids)
    n_tree = len(tok("tree", add_special_tokens=False).input_ids)
    w = c.weights[1]
    assert w[0] == 1 and (w[1:1 + n_snow] == np.float32(1.5)).all()
    assert np.allclose(w[1 + n_snow:1 + n_snow + n_tree], 1 / 1.1) and (w[1 + n_snow + n_tree:] == 1).all()
    assert (c.weights[0] == 1).all()


def test_emphasize_restores_each_chunk_mean():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 77, 8)).astype(np.float32) + 0.3
    w = np.ones((3, 77), np.float32)
    w[1, 5:9] = 1.4
    w[2, 2] = 0.5
    out = emphasize(z, w)
    assert np.array_equal(out[0], z[0])                                  # all-1 chunk untouched
    for r in (1, 2):
        assert out[r].mean() == pytest.approx(z[r].mean(), rel=1e-5)
        scale = z[r].mean() / (z[r] * w[r][:, None]).mean()
        np.testing.assert_allclose(out[r], z[r] * w[r][:, None] * scale, rtol=1e-5)


# ---- images against diffusers ------------------------------------------------------------------

@pytest.mark.parametrize("clip_skip", [1, 2])
def test_long_prompts_and_clip_skip_match_diffusers(pipe32, torch_parts, clip_skip):
    """A 3+-chunk prompt with a 2-chunk negative prompt; clip skip on both (the web UI's numbering)."""
    tok = torch_parts.tokenizer
    pos, neg = reference_chunks(tok, LONG), reference_chunks(tok, NEGATIVE_LONG)
    k = max(len(pos), len(neg))
    assert len(neg) < len(pos) == k
    lat = latents()
    ref = diffusers_from_embeds(torch_parts, encode(torch_parts, pos, k, clip_skip),
                                encode(torch_parts, neg, k, clip_skip), lat)
    res = pipe32.generate(LONG, negative=NEGATIVE_LONG, steps=8, height=H, width=W, latents=lat,
                          clip_skip=clip_skip)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)
    assert res.images.std() > 1


def test_clip_skip_changes_the_image(pipe32):
    a = pipe32.generate("a fox", steps=4, height=H, width=W, latents=latents(), clip_skip=1)
    b = pipe32.generate("a fox", steps=4, height=H, width=W, latents=latents(), clip_skip=2)
    assert psnr(a.images, b.images) < 40


@pytest.fixture(scope="module")
def biased_pipe(biased_fp32):
    return Pipeline(biased_fp32, backend="onnxruntime-cpu")


def test_weighted_prompt_matches_diffusers(biased_pipe, biased_torch):
    """Emphasis against the web UI's rule written in torch on diffusers' own text encoder."""
    torch_parts, pipe32 = biased_torch, biased_pipe
    tok = torch_parts.tokenizer
    segments = [("a ", 1.0), ("red fox", 2.5 * 1.1), (" in ", 1.0), ("the ", 0.2), ("snow", 0.2 / 1.1)]
    ids, weights = [], []
    for text, w in segments:
        t = tok(text, add_special_tokens=False).input_ids
        ids += t
        weights += [w] * len(t)
    chunk = [tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(ids))
    chunk_w = [1.0, *weights] + [1.0] * (76 - len(ids))
    lat = latents(9)
    cond = encode(torch_parts, [chunk], 1, weights=[chunk_w])
    uncond = encode(torch_parts, reference_chunks(tok, "ugly"), 1)
    ref = diffusers_from_embeds(torch_parts, cond, uncond, lat, steps=6)
    res = pipe32.generate("a ((red fox:2.5)) in (the [snow]:0.2)", negative="ugly", steps=6, height=H,
                          width=W, latents=lat)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)
    plain = pipe32.generate("a red fox in the snow", negative="ugly", steps=6, height=H, width=W, latents=lat)
    assert psnr(plain.images, res.images) < 40            # the weights did change the image


def test_weight_one_is_exactly_the_plain_prompt(biased_pipe):
    pipe32 = biased_pipe
    lat = latents(11)
    plain = pipe32.generate("a red fox in the snow", negative="blurry", steps=5, height=H, width=W, latents=lat)
    for prompt in ("a (red:1.0) fox in the snow", "a red (fox:1.0) in (the snow:1)"):
        same = pipe32.generate(prompt, negative="(blurry:1.0)", steps=5, height=H, width=W, latents=lat)
        assert np.array_equal(plain.images, same.images), prompt


def test_long_prompt_gets_its_own_shape_plan(pipe32):
    k = len(pipe32.conditioning(()).chunks(LONG))
    pipe32.generate("a fox", steps=2, height=H, width=W, seed=1)
    pipe32.generate(LONG, steps=2, height=H, width=W, seed=1)
    assert k >= 3 and {d.chunks for d, _variant, _controlnets in pipe32.plans} >= {1, k}


def test_engine_prompt_limit_is_one_line(pipe32):
    """A backend whose engines were built for fewer chunks than the prompt needs."""
    import copy
    pipe = copy.copy(pipe32)
    pipe.manifest = {**pipe32.manifest, "engines": {pipe32.backend_name: {
        "text_encoder": {"key": {"options": {"max_prompt_chunks": 2}}},
        "vae_decoder": {"key": {"options": {}}}}}}
    from sdrt.errors import UserError
    k = len(pipe32.conditioning(()).chunks(LONG))
    with pytest.raises(UserError, match=rf"needs {k} chunks .* at most 2: run `sdrt build .* --max-prompt-chunks {k}`"):
        pipe.generate(LONG, steps=2, height=H, width=W, seed=1)


# ---- CLI --------------------------------------------------------------------------------------

def test_cli_clip_skip_and_unbalanced_warning(tiny_fp32, tmp_path):
    out = tmp_path / "o.png"
    p = run_cli("generate", tiny_fp32, "a (red fox", "--clip-skip", "2", "--steps", "2", "--height", "64",
                "--width", "64", "--backend", "onnxruntime-cpu", "--out", out)
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if "unbalanced" in line]
    assert len(warnings) == 1 and warnings[0].startswith("sdrt: warning:"), p.stderr
    assert out.is_file()


def test_bad_clip_skip(tiny_fp32, pipe32, tmp_path):
    from sdrt.errors import UserError
    for value in (0, -1, 2.0):
        with pytest.raises(UserError, match=f"clip skip {value} must be 1..2"):
            pipe32.generate("x", steps=2, height=H, width=W, clip_skip=value)
    out = tmp_path / "o.png"
    p = run_cli("generate", tiny_fp32, "x", "--clip-skip", "3", "--steps", "2", "--height", "64",
                "--width", "64", "--backend", "onnxruntime-cpu", "--out", out)
    assert_user_error(p, "--clip-skip 3", "1..2")            # the CLI names the flag
    assert not out.exists()


# ---- prompt syntax "plain" ----------------------------------------------------------------------

PLAIN = "a (red fox:1.2) in [snow] BREAK \\(trees\\)"


def test_plain_syntax_tokenizes_the_text_as_it_is(tiny_fp32, torch_parts):
    cond = Conditioning(ClipTokenizer.from_dir(tiny_fp32 / "tokenizer"), np.zeros((1000, 32), np.float32), 77)
    c = cond.chunks(PLAIN, "plain")
    ref = torch_parts.tokenizer(PLAIN, padding="max_length", max_length=77, truncation=True).input_ids
    assert c.ids.tolist() == [ref] and (c.weights == 1).all()
    assert cond.chunks(PLAIN).ids.tolist() != [ref]                       # webui: brackets are syntax


def test_plain_syntax_matches_diffusers_prompt(biased_pipe, biased_torch):
    """diffusers' own prompt encoding (no prompt_embeds): brackets, weights and BREAK are words."""
    lat = latents(3)
    out = biased_torch(prompt=PLAIN, negative_prompt="ugly (blurry:1.5)", num_inference_steps=8,
                       guidance_scale=7.5, height=H, width=W, latents=__import__("torch").from_numpy(lat),
                       output_type="np")
    ref = (out.images * 255).round().astype(np.uint8)
    plain = biased_pipe.generate(PLAIN, negative="ugly (blurry:1.5)", steps=8, height=H, width=W, latents=lat,
                                 prompt_syntax="plain")
    assert psnr(plain.images, ref) >= 50, psnr(plain.images, ref)
    webui = biased_pipe.generate(PLAIN, negative="ugly (blurry:1.5)", steps=8, height=H, width=W, latents=lat)
    assert psnr(webui.images, ref) < 40, psnr(webui.images, ref)


def test_cli_prompt_syntax(tiny_fp32, tmp_path):
    out = tmp_path / "o.png"
    p = run_cli("generate", tiny_fp32, "a (fox:1.2)", "--prompt-syntax", "plain", "--steps", "2", "--height", "64",
                "--width", "64", "--backend", "onnxruntime-cpu", "--out", out)
    assert p.returncode == 0, p.stderr
    assert out.is_file()
    p = run_cli("generate", tiny_fp32, "x", "--prompt-syntax", "markdown", "--out", out)
    assert p.returncode == 2 and "--prompt-syntax" in p.stderr and "Traceback" not in p.stderr
