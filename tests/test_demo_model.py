"""The trained demo model (sdrt/demo_model/): its domain, checker, tokenizer, training script, and
what its exports draw on ONNX Runtime CPU, against diffusers and against the captions."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from sdrt import scenes
from sdrt.benchmarks import checker, scene_features
from sdrt.demo import DEMO_MODEL, EXPORT_NAME
from sdrt.engine.pipeline import Pipeline
from test_generate import diffusers_images, psnr

# seen captions, and one held-out combination; fixed seeds: the images are deterministic
PROMPTS = [
    "a small red circle on a blue background",
    "a large yellow triangle on a black background, top left",
    "a large white square on a green background",
    "a small purple triangle on a yellow background, bottom right",
    "a large blue square on a yellow background",   # held out: (blue, square, yellow)
]


@pytest.fixture(scope="session")
def demo_fp16(tmp_path_factory):
    from sdrt.export.export import export
    return export(DEMO_MODEL, tmp_path_factory.mktemp("work") / "demo-fp16", precision="fp16")


def generate_prompts(work_dir, steps=25, guidance=5.0):
    pipe = Pipeline(work_dir, backend="onnxruntime-cpu")
    return np.stack([pipe.generate(p, steps=steps, guidance=guidance, seed=i).images[0]
                     for i, p in enumerate(PROMPTS)])


def scene_of(caption: str) -> scenes.Scene:
    return next(s for s in scenes.all_scenes() if s.caption == caption)


# --- the domain ---------------------------------------------------------------------------------

def test_checker_reads_dataset_images():
    """Every 3rd scene of the domain, drawn exactly, is read back right in every field."""
    for s in scenes.all_scenes()[::3]:
        assert all(checker.correct(checker.read(scenes.render(s)), s).values()), s


def test_checker_sees_wrong_images():
    s = scenes.Scene("circle", "red", "blue", "large", "top left")
    wrong = scenes.render(scenes.Scene("square", "green", "blue", "small", "bottom right"))
    assert checker.correct(checker.read(wrong), s) == {"colour": False, "background": True, "shape": False,
                                                       "size": False, "position": False}
    blank = np.full((scenes.SIZE, scenes.SIZE, 3), scenes.PALETTE["blue"], np.uint8)
    assert checker.read(blank).shape is None


def test_held_out_split():
    held = scenes.split(held_out=True)
    seen = scenes.split(held_out=False)
    assert len(held) + len(seen) == len(scenes.all_scenes()) == 3 * 8 * 7 * 2 * 9
    assert {(s.colour, s.shape, s.background) for s in held} == set(scenes.HELD_OUT)
    for field in ("colour", "shape", "background"):   # every value is still seen in training
        assert {getattr(s, field) for s in held} <= {getattr(s, field) for s in seen}
    assert scenes.Scene("circle", "red", "orange").caption == "a small red circle on an orange background"


def test_scene_features_classify_and_fid():
    w = scene_features.load()
    sc = scenes.all_scenes()[1::4]
    images = np.stack([scenes.render(s) for s in sc])
    pred = scene_features.predict(images, w)
    for head in scene_features.HEADS:
        assert np.mean([p == getattr(s, head) for p, s in zip(pred[head], sc)]) > 0.99, head
    f = scene_features.features(images, w)
    assert abs(scene_features.frechet_distance(f, f)) < 1e-3 * np.trace(np.cov(f, rowvar=False))
    other = scene_features.features(images[:, ::-1], w)          # flipped upside down
    assert scene_features.frechet_distance(f, other) > 10 * abs(scene_features.frechet_distance(f, f))


# --- the tokenizer ------------------------------------------------------------------------------

def test_word_merges_make_each_word_one_token():
    from sdrt.export.clip_vocab import bpe, word_merges
    merges = word_merges(scenes.WORDS)
    assert all(bpe(w, merges) == [w + "</w>"] for w in scenes.WORDS if len(w) > 1)
    assert len(bpe("zebra", merges)) > 1          # other words fall back to pieces


def test_demo_tokenizer_same_in_sdrt_and_transformers():
    from transformers import CLIPTokenizer

    from sdrt.engine.tokenizer import ClipTokenizer
    from test_tokenizer import runtime_ids
    ours = ClipTokenizer.from_dir(DEMO_MODEL / "tokenizer")
    theirs = CLIPTokenizer.from_pretrained(DEMO_MODEL / "tokenizer")
    prompts = [s.caption for s in scenes.all_scenes()[::37]] + [
        "", "A Large RED circle, on a blue   background!", "a zebra on a unicycle", "über-purple 42 triangles",
        "a small red circle on a blue background, top left, top left, top left, top left"]
    for p in prompts:
        want = theirs(p, padding="max_length", max_length=16, truncation=True).input_ids
        assert runtime_ids(ours, [p], 16)[0].tolist() == want, p
    assert runtime_ids(ours, ["triangle"], 16)[0, 1] == theirs.convert_tokens_to_ids("triangle</w>")


def test_demo_tokenizer_clip_files_match_tokenizer_json(tmp_path):
    """vocab.json + merges.txt (CLIP's format) alone give the same ids as tokenizer.json."""
    import shutil

    from sdrt.engine.tokenizer import ClipTokenizer
    from test_tokenizer import runtime_ids
    shutil.copytree(DEMO_MODEL / "tokenizer", tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").unlink()
    prompts = [s.caption for s in scenes.all_scenes()[::41]] + ["a zebra, über-purple!"]
    want = runtime_ids(ClipTokenizer.from_dir(DEMO_MODEL / "tokenizer"), prompts, 16)
    assert np.array_equal(runtime_ids(ClipTokenizer.from_dir(tmp_path / "tok"), prompts, 16), want)


# --- the committed model on ONNX Runtime CPU ----------------------------------------------------

def test_demo_model_draws_what_prompts_say(demo_fp32):
    """Colour and background of every prompt, shape and position of the seen ones, read from the pixels."""
    images = generate_prompts(demo_fp32)
    for img, caption in zip(images, PROMPTS):
        s, got = scene_of(caption), checker.read(img)
        hit = checker.correct(got, s)
        assert hit["colour"] and hit["background"], (caption, got)
        if not s.held_out:
            assert hit["shape"] and hit["position"], (caption, got)


def test_demo_fp16_agrees_with_fp32(demo_fp32, demo_fp16):
    a, b = generate_prompts(demo_fp32), generate_prompts(demo_fp16)
    for x, y in zip(a, b):
        assert checker.read(x) == checker.read(y)
    assert psnr(a, b) > 30, psnr(a, b)


@pytest.mark.parametrize("steps,guidance", [(10, 5.0), (5, 1.0)])
def test_demo_model_matches_diffusers(demo_fp32, steps, guidance):
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    prompt = PROMPTS[1]
    ref = diffusers_images(DEMO_MODEL, prompt, "", steps, guidance, scenes.SIZE, scenes.SIZE, latents)
    res = Pipeline(demo_fp32, backend="onnxruntime-cpu").generate(
        prompt, steps=steps, guidance=guidance, batch=2, latents=latents)
    assert psnr(res.images, ref) >= 50, psnr(res.images, ref)


# --- the CLI ------------------------------------------------------------------------------------

def test_cli_demo_grid_and_own_prompt(demo_root):
    p = run_cli("demo", "--dir", demo_root / "sdrt-demo", "--steps", "10", cwd=demo_root)
    assert p.returncode == 0, p.stderr
    assert "wrote" in p.stdout and "backend: onnxruntime-cpu" in p.stdout and "denoise (10 steps)" in p.stdout
    from PIL import Image
    grid = Image.open(demo_root / "sdrt-demo" / "demo.png")
    assert grid.size[0] > 4 * 128 and grid.size[1] > 2 * 128
    assert "vae encoder" not in p.stdout and "median over 8 image(s)" in p.stdout   # text to image, all 8
    setup = next(line for line in p.stdout.splitlines() if line.strip().startswith("setup (first image)"))
    assert float(setup.split()[-1]) > 0                          # the first image's, not the last one's
    before = (demo_root / "sdrt-demo" / "demo.png").read_bytes()
    p = run_cli("demo", "--dir", demo_root / "sdrt-demo", "--steps", "5", "--prompt", "a large red square on a "
                "white background", cwd=demo_root)
    assert p.returncode == 0, p.stderr
    assert (demo_root / "sdrt-demo" / "demo.png").read_bytes() == before       # the 8-caption grid stays
    assert Image.open(demo_root / "sdrt-demo" / "prompts.png").size[0] < grid.size[0]   # one tile


def test_demo_reuses_its_export(demo_fp32, tmp_path, monkeypatch):
    import shutil

    from sdrt import demo
    from sdrt.export import export
    shutil.copytree(demo_fp32, tmp_path / EXPORT_NAME)
    monkeypatch.setattr(export, "export", lambda *a, **k: pytest.fail("export ran again"))
    assert demo.demo_export(tmp_path) == tmp_path / EXPORT_NAME
    p = run_cli("demo", "--dir", tmp_path, "--steps", "3", "--no-upscale", "--prompt",
                "a small red circle on a blue background")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "prompts.png").is_file() and "[demo] sdrt export" not in p.stderr


def test_cli_init_demo_copies_the_model(tmp_path):
    p = run_cli("init", tmp_path / "m", "--arch", "demo")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["unet"] == ["diffusers",
                                                                                    "UNet2DConditionModel"]
    assert_user_error(run_cli("init", tmp_path / "m", "--arch", "demo"), "already exists")


def test_cli_bench_defaults_to_the_demo_model(demo_root):
    p = run_cli("bench", "--no-reference", "--backends", "onnxruntime-cpu", "--batches", "1", "--steps", "2",
                "--runs", "1", "--out", demo_root / "bench", cwd=demo_root)
    assert p.returncode == 0, p.stderr
    [result] = (demo_root / "bench").glob("*.json")
    [record] = json.loads(result.read_text())["records"]
    assert (record["export"], record["height"], record["width"]) == (EXPORT_NAME, scenes.SIZE, scenes.SIZE)


def test_cli_eval_small(demo_fp32, tmp_path):
    p = run_cli("eval", demo_fp32, "--n", "3", "--steps", "10", "--backend", "onnxruntime-cpu",
                "--out", tmp_path / "eval.json")
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "eval.json").read_text())
    for split in ("seen", "held_out"):
        assert r[split]["n"] == 3
        assert all(0 <= r[split][f] <= 100 for f in checker.FIELDS)
        assert np.isfinite(r[split]["fid"])
    assert r["seen"]["background"] > 60      # 3 images: at least 2 backgrounds right


def test_cli_demo_and_eval_random_seed(demo_root, demo_fp32, tmp_path):
    """--seed -1: a random seed, reported (demo: the seeds line; eval: the report and stdout)."""
    import re
    p = run_cli("demo", "--dir", demo_root / "sdrt-demo", "--steps", "2", "--seed", "-1", "--no-upscale", "--prompt",
                "a small red circle on a blue background", cwd=demo_root)
    assert p.returncode == 0, p.stderr
    assert re.search(r"seeds (\d+)\.\.\1\b", p.stderr), p.stderr
    p = run_cli("eval", demo_fp32, "--n", "3", "--steps", "2", "--seed", "-1", "--backend", "onnxruntime-cpu",
                "--out", tmp_path / "eval.json")
    assert p.returncode == 0, p.stderr
    seed = json.loads((tmp_path / "eval.json").read_text())["seed"]
    assert 0 <= seed < 2 ** 32 and f"seed {seed}" in p.stdout


def test_cli_eval_rejects_other_models(tiny_fp32):
    assert_user_error(run_cli("eval", tiny_fp32, "--n", "3"), "not an export of the demo model")
    assert_user_error(run_cli("eval", tiny_fp32, "--n", "1"), "--n")


# --- training -----------------------------------------------------------------------------------

def test_train_demo_smoke_reproducible_and_loads_in_diffusers(tmp_path):
    """A few steps: the loss falls, a snapshot after k steps equals a `--steps k` run (same seed),
    and the folder is an ordinary diffusers pipeline."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sdrt.export.train_demo import train
    small = dict(vae_steps=2, batch=8, vae_batch=4, warmup=1, snapshot_every=12)
    train(tmp_path / "a", steps=24, seed=5, **small)
    train(tmp_path / "b", steps=12, seed=5, **small)
    losses = json.loads((tmp_path / "a" / "train_demo.json").read_text())["unet_loss_mean_per_10_steps"]
    assert losses[-1] < losses[0], losses
    snap = StableDiffusionPipeline.from_pretrained(tmp_path / ".a.snapshot")
    b = StableDiffusionPipeline.from_pretrained(tmp_path / "b")
    for x, y in zip(snap.unet.parameters(), b.unet.parameters()):
        assert torch.equal(x, y)
    b.set_progress_bar_config(disable=True)
    out = b(PROMPTS[0], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, scenes.SIZE, scenes.SIZE, 3)
    assert_user_error(run_cli("train-demo", tmp_path / "b", "--steps", "3"), "already exists")
    assert_user_error(run_cli("train-demo", tmp_path / "c", "--steps", "0"), "--steps")


def test_train_demo_loss_weight_keeps_the_high_noise_steps():
    """In x0 terms the v-loss weight is min(SNR, γ) + 1: 1 at pure noise (where the layout is decided),
    γ + 1 at low noise; the ε weight (Min-SNR-γ) is min(SNR, γ), ~0 at pure noise."""
    import torch
    from diffusers import DDPMScheduler

    from sdrt.export.train_demo import SCHEDULER, loss_weight
    a_bar = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "set_alpha_to_one"}).alphas_cumprod
    t = torch.tensor([0, 300, 600, 999])
    snr = a_bar[t] / (1 - a_bar[t])
    x0_v = loss_weight(a_bar, t, 5.0, "v_prediction") * (snr + 1)      # ||v̂ - v||² = (SNR + 1) ||x̂0 - x0||²
    x0_eps = loss_weight(a_bar, t, 5.0, "epsilon") * snr                # ||ε̂ - ε||² = SNR ||x̂0 - x0||²
    assert torch.allclose(x0_v, snr.clamp(max=5.0) + 1) and torch.allclose(x0_eps, snr.clamp(max=5.0))
    assert x0_v[-1] > 0.99 and x0_eps[-1] < 1e-3 and x0_v[0] == 6.0
