"""The request object (sdrt.engine.request): checks made once with errors naming the field, the
one "FILE[:X]" rule, seeds (-1 = random, reported; one per sample), prompt lists, LoRAs and
embeddings in a request, and the per-step hook. ONNX Runtime CPU on the tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from sdrt.engine import embedding_files
from sdrt.engine import lora as L
from sdrt.engine.pipeline import Pipeline
from sdrt.engine.request import Cancelled, GenerateRequest, RequestError, parse_spec, resolve_seed
from test_generate import psnr

H = W = 64


@pytest.fixture(scope="module")
def pipe(tiny_fp32):
    return Pipeline(tiny_fp32, backend="onnxruntime-cpu")


# ---- checks without a model ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field,words", [
    (dict(mask="m.png"), "mask", "mask needs image"),
    (dict(strength=0.5), "strength", "strength needs image"),
    (dict(image="i.png", strength=0.0), "strength", "strength 0.0 must be in (0, 1]"),
    (dict(seed=-2), "seed", "seed -2 must be an integer >= 0, or -1"),
    (dict(seed=[1, -3], batch=2), "seed", "seed -3"),
    (dict(seed=1.5), "seed", "seed 1.5"),
    (dict(batch=0), "batch", "batch must be a positive integer"),
    (dict(steps=0), "steps", "steps must be a positive integer"),
    (dict(vae_batch=0), "vae_batch", "vae batch must be a positive integer"),
    (dict(width="64"), "width", "width must be an integer"),
    (dict(guidance=float("nan")), "guidance", "guidance nan"),
    (dict(prompt=["a", "b"], batch=3), "prompt", "prompt has 2 entries for a batch of 3"),
    (dict(prompt=["a", "b"], negative=["n"]), "negative", "negative has 1 entries for a batch of 2"),
    (dict(prompt=["a", 3]), "prompt", "a string or a list of strings"),
    (dict(prompt_syntax="markdown"), "prompt_syntax", "prompt syntax 'markdown' is not one of webui, plain"),
    (dict(sampler="heun"), "sampler", "unknown sampler 'heun'"),
    (dict(sampler="euler", schedule="exponential"), "schedule", "unknown schedule 'exponential'"),
    (dict(sampler="DPM++ 2M Karras", schedule="uniform"), "schedule", "schedule 'uniform' contradicts"),
    (dict(sampler="ddim", schedule="karras"), "schedule", "schedule 'karras' needs a sigma-based sampler"),
    (dict(cfg_cutoff=1.5), "cfg_cutoff", "cfg cutoff 1.5 must be a fraction"),
    (dict(loras=[("a.safetensors", 1.0, 2)]), "loras", "loras entry"),
])
def test_request_checks_name_the_field(kwargs, field, words):
    with pytest.raises(RequestError) as e:
        GenerateRequest(**{"prompt": "x", **kwargs})
    assert e.value.field == field and words in str(e.value), str(e.value)
    flag = "--" + field.replace("_", "-")
    assert flag in e.value.render(lambda f: "--" + f.replace("_", "-"))


def test_request_defaults_and_forms():
    r = GenerateRequest("a fox")
    assert (r.batch, r.steps, r.guidance, r.prompt_syntax, r.sampler.kind, r.clip_skip) == (1, 50, 7.5, "webui", "ddim", 1)
    assert GenerateRequest("a", sampler="DPM++ 2M SDE Karras").sampler.label == "dpmpp_2m_sde/karras"
    r = GenerateRequest(["a", "b", "c"], negative="n", seed=[1, 2, 3], guidance=7.5)
    assert r.batch == 3 and r.rows() == ["n"] * 3 + ["a", "b", "c"]
    assert GenerateRequest("a", batch=2, guidance=1.0).rows() == ["a", "a"]
    r = GenerateRequest("a", embeddings=["e.pt:<tok>", ("f.pt", "other")], loras=["l.safetensors:0.5", ("m", 2)])
    assert r.embeddings == [("e.pt", "<tok>"), ("f.pt", "other")] and r.loras == [("l.safetensors", 0.5), ("m", 2)]


def test_one_spec_rule_for_loras_and_embeddings(tmp_path):
    assert parse_spec("a.safetensors:0.7", float, 1.0) == ("a.safetensors", 0.7)
    assert parse_spec("a.pt:<tok>") == ("a.pt", "<tok>")
    assert parse_spec("a.pt") == ("a.pt", None) and parse_spec("a.pt:") == ("a.pt", None)
    assert parse_spec(r"C:\loras\a.safetensors", float, 1.0) == (r"C:\loras\a.safetensors", 1.0)
    assert parse_spec(r"C:\loras\a.safetensors:0.5", float, 1.0) == (r"C:\loras\a.safetensors", 0.5)
    assert parse_spec("odd:name.safetensors", float, 1.0) == ("odd:name.safetensors", 1.0)
    named = tmp_path / "a:b"
    named.write_bytes(b"")
    assert parse_spec(str(named)) == (str(named), None)              # an existing file keeps its colon
    # both readers take both forms, by the same rule
    assert L.parse_spec(("dir/a.safetensors", 0.3)) == ("dir/a.safetensors", 0.3)
    assert L.parse_spec("dir/a.safetensors:0.3") == ("dir/a.safetensors", 0.3)
    assert embedding_files.parse_spec("dir/e.pt:<t>") == (embedding_files.Path("dir/e.pt"), "<t>")
    assert embedding_files.parse_spec(("dir/e.pt", "<t>")) == (embedding_files.Path("dir/e.pt"), "<t>")


# ---- seeds ----------------------------------------------------------------------------------------

def test_one_seed_is_the_noise_it_always_was(pipe):
    lat = np.random.default_rng(7).standard_normal((2, 4, H // 8, W // 8), dtype=np.float32)
    a = pipe.generate("a fox", steps=2, height=H, width=W, batch=2, seed=7)
    b = pipe.generate("a fox", steps=2, height=H, width=W, batch=2, latents=lat)
    assert np.array_equal(a.images, b.images) and a.seed == 7 and b.seed is None


def test_random_seed_is_reported_and_reproduces(pipe):
    r = pipe.generate("a fox", steps=2, height=H, width=W, seed=-1)
    assert isinstance(r.seed, int) and 0 <= r.seed < 2 ** 32 and r.timings["seed"] == r.seed
    again = pipe.generate("a fox", steps=2, height=H, width=W, seed=r.seed)
    assert np.array_equal(r.images, again.images)
    assert isinstance(pipe.generate("a fox", steps=1, height=H, width=W).seed, int)   # none: random too
    with pytest.raises(RequestError, match="seed -5"):
        resolve_seed(-5)


def test_a_batch_of_requests_equals_each_request(pipe):
    """Prompts and seeds per sample (what a server batching requests sends): sample i is the
    request i made alone."""
    batch = pipe.generate(["a red fox", "a blue tree"], negative=["ugly", ""], steps=3, height=H, width=W,
                          seed=[3, -1])
    assert batch.seed[0] == 3 and isinstance(batch.seed[1], int)
    for i, (p, n) in enumerate([("a red fox", "ugly"), ("a blue tree", "")]):
        one = pipe.generate(p, negative=n, steps=3, height=H, width=W, seed=batch.seed[i])
        assert psnr(batch.images[i:i + 1], one.images) >= 50, (i, psnr(batch.images[i:i + 1], one.images))
    assert psnr(batch.images[:1], batch.images[1:]) < 40


# ---- the per-step hook ----------------------------------------------------------------------------

def test_on_step_reports_each_step_and_can_cancel(pipe):
    calls = []
    full = pipe.run(GenerateRequest("a fox", steps=4, height=H, width=W, seed=1),
                    on_step=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]

    def cancel_after_two(done, total):
        calls.append(done)
        if done == 2:
            raise Cancelled()
    calls.clear()
    with pytest.raises(Cancelled):
        pipe.run(GenerateRequest("a fox", steps=4, height=H, width=W, seed=1), on_step=cancel_after_two)
    assert calls == [1, 2]                                               # no step after the cancel
    again = pipe.run(GenerateRequest("a fox", steps=4, height=H, width=W, seed=1))
    assert np.array_equal(again.images, full.images)                     # the pipeline is left usable


def test_image_to_image_counts_the_steps_it_runs(pipe):
    calls = []
    img = np.full((H, W, 3), 128, np.uint8)
    pipe.generate("a fox", steps=8, strength=0.5, image=img, seed=0, on_step=lambda d, t: calls.append((d, t)))
    assert calls == [(d, 4) for d in range(1, 5)]


# ---- LoRAs and embeddings in a request --------------------------------------------------------------

def test_request_loras_switch_only_when_the_set_differs(tiny_dir, tiny_fp32, tmp_path):
    from test_lora import _modules, write_peft
    lora = write_peft(tmp_path / "peft.safetensors", _modules(tiny_dir), seed=1)
    pipe = Pipeline(tiny_fp32, backend="onnxruntime-cpu")
    switches = []
    set_loras = pipe.set_loras
    pipe.set_loras = lambda loras: switches.append(list(loras)) or set_loras(loras)
    run = lambda **kw: pipe.generate("a fox", steps=2, height=H, width=W, seed=0, **kw).images
    base = run()
    with_lora = run(loras=[f"{lora}:0.8"])
    assert switches == [[(str(lora), 0.8)]]
    assert np.array_equal(run(loras=[(lora, 0.8)]), with_lora) and np.array_equal(run(), with_lora)
    assert len(switches) == 1                                      # the same set (or None): no switch
    ref = Pipeline(tiny_fp32, backend="onnxruntime-cpu", loras=[(lora, 0.8)])
    assert np.array_equal(ref.generate("a fox", steps=2, height=H, width=W, seed=0).images, with_lora)
    assert psnr(with_lora, base) < 40
    assert np.array_equal(run(loras=[]), base) and len(switches) == 2


def test_request_embeddings(tiny_fp32, tmp_path):
    """Embeddings in a request, in either form, replace the pipeline's for that call."""
    from safetensors.numpy import save_file
    table = np.load(tiny_fp32 / "token_embedding.npy")
    vec = np.random.default_rng(0).standard_normal((1, table.shape[1])).astype(np.float32)
    save_file({"emb_params": vec}, str(tmp_path / "style.safetensors"))
    pipe = Pipeline(tiny_fp32, backend="onnxruntime-cpu")
    run = lambda **kw: pipe.generate("a <s> fox", steps=2, height=H, width=W, seed=0, **kw).images
    plain = run()
    a = run(embeddings=[f"{tmp_path / 'style.safetensors'}:<s>"])
    b = run(embeddings=[(tmp_path / "style.safetensors", "<s>")])
    assert np.array_equal(a, b) and psnr(a, plain) < 40
    assert np.array_equal(run(), plain)                            # None: the pipeline's (none)


# ---- the CLI --------------------------------------------------------------------------------------

def test_cli_seed(tiny_fp32, tmp_path):
    out = tmp_path / "o.png"
    p = run_cli("generate", tiny_fp32, "a fox", "--seed", "-1", "--steps", "2", "--height", "64", "--width", "64",
                "--backend", "onnxruntime-cpu", "--out", out)
    assert p.returncode == 0, p.stderr
    [seed] = [int(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("seed ")]
    again = tmp_path / "again.png"
    p = run_cli("generate", tiny_fp32, "a fox", "--seed", str(seed), "--steps", "2", "--height", "64",
                "--width", "64", "--backend", "onnxruntime-cpu", "--out", again)
    assert p.returncode == 0 and f"seed {seed}" in p.stdout, p.stderr
    assert out.read_bytes() == again.read_bytes()
    bad = tmp_path / "bad.png"
    assert_user_error(run_cli("generate", tiny_fp32, "x", "--seed", "-2", "--out", bad), "--seed -2", "-1")
    assert_user_error(run_cli("demo", "--dir", tmp_path / "d", "--seed", "-7"), "--seed -7")
    assert_user_error(run_cli("eval", tiny_fp32, "--seed", "-3"), "--seed -3")
    assert not bad.exists() and not (tmp_path / "d").exists()


def test_cli_request_errors_name_flags(tiny_fp32, tmp_path):
    out = tmp_path / "o.png"
    assert_user_error(run_cli("generate", tiny_fp32, "x", "--vae-batch", "0", "--out", out), "--vae-batch")
    assert_user_error(run_cli("generate", tiny_fp32, "x", "--mask", "m.png", "--out", out), "--mask needs --image")
    assert not out.exists()
