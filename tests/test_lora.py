"""LoRA without re-export or rebuild: the export's weight map, LoRA files in diffusers/PEFT and
kohya layouts, merged weights on ONNX Runtime CPU against diffusers' load_lora_weights."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from sdrt import manifest as mf
from sdrt.engine import lora as L
from sdrt.engine.pipeline import Pipeline
from sdrt.errors import UserError
from test_generate import psnr

H = W = 64
STEPS = 6


# ---- LoRA files with random low-rank weights --------------------------------------------------------

def _modules(tiny_dir):
    """{component: {module path: weight shape}} of the tiny pipeline's Linear/Conv layers."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    out = {}
    for comp, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        model = cls.from_pretrained(tiny_dir / comp)
        out[comp] = {n: tuple(m.weight.shape) for n, m in model.named_modules()
                     if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    return out


def _pick(modules: dict, seed: int) -> dict:
    """Attention projections, feed-forward, 1x1 and 3x3 convs, time embedding; text attention and MLP."""
    unet_kinds = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
                  "proj_in", "resnets.0.conv1", "conv_shortcut", "time_emb_proj")
    te_kinds = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    rng = np.random.default_rng(seed)
    unet = [n for n in modules["unet"] if n.endswith(unet_kinds)]
    te = [n for n in modules["text_encoder"] if n.endswith(te_kinds)]
    unet = [n for n in unet if rng.random() < 0.8]
    te = [n for n in te if rng.random() < 0.8]
    return {"unet": {n: modules["unet"][n] for n in unet}, "text_encoder": {n: modules["text_encoder"][n] for n in te}}


def _factors(shape, rank, rng, size=0.6):
    """(down, up): down [r, in(, kh, kw)], up [out, r(, 1, 1)]."""
    out, rest = shape[0], shape[1:]
    down = rng.standard_normal((rank, *rest)).astype(np.float32) * size / np.sqrt(np.prod(rest))
    up = rng.standard_normal((out, rank) + (1, 1) * (len(shape) == 4)).astype(np.float32) * size / np.sqrt(rank)
    return down, up


def write_peft(path, modules, seed, rank=4, alpha=8.0, te_prefix="text_model."):
    """diffusers/PEFT layout: unet.<module>.lora_A/B.weight, alpha in the adapter metadata."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    tensors, meta = {}, {}
    for comp, mods in _pick(modules, seed).items():
        for name, shape in mods.items():
            down, up = _factors(shape, rank, rng)
            key = f"{comp}.{te_prefix if comp == 'text_encoder' else ''}{name}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
        meta.update({f"{comp}.r": rank, f"{comp}.lora_alpha": alpha, f"{comp}.target_modules": sorted(mods)})
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return path


def write_kohya(path, modules, seed, rank=2, alpha=1.0, te_prefix="text_model_"):
    """kohya layout: lora_unet_<module_with_underscores>.lora_down/lora_up.weight, .alpha."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    tensors = {}
    for comp, mods in _pick(modules, seed).items():
        for name, shape in mods.items():
            down, up = _factors(shape, rank, rng, size=1.2)
            flat = name.replace(".", "_")
            key = f"lora_unet_{flat}" if comp == "unet" else f"lora_te_{te_prefix}{flat}"
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = np.array(alpha, np.float32)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def files(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    mods = _modules(tiny_dir)
    return {"peft": write_peft(d / "peft.safetensors", mods, seed=1),
            "kohya": write_kohya(d / "kohya.safetensors", mods, seed=2),
            "modules": mods, "dir": d}


def _latents(seed=5):
    return np.random.default_rng(seed).standard_normal((1, 4, H // 8, W // 8)).astype(np.float32)


def diffusers_lora_image(model_dir, loras, prompt="a fox", negative="blurry"):
    """diffusers' own pipeline with load_lora_weights + set_adapters (PEFT backend), FP32 CPU."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    if names:
        pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
    out = pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=7.5,
               height=H, width=W, latents=torch.from_numpy(_latents()), output_type="np")
    return (out.images * 255).round().astype(np.uint8)


def sdrt_image(pipe, prompt="a fox", negative="blurry"):
    return pipe.generate(prompt, negative=negative, steps=STEPS, guidance=7.5, height=H, width=W,
                         latents=_latents()).images


# ---- the export's weight map ------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_export_maps_every_linear_and_conv_weight(precision, request, tiny_dir, files):
    """Every Linear/Conv weight of UNet and text encoder has its initializer, and the bytes the
    map points at are that weight (transposed where the exporter wrote a MatMul)."""
    import onnx
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    work = request.getfixturevalue(f"tiny_{precision}")
    man = mf.load(work)
    dtype = np.float16 if precision == "fp16" else np.float32
    for comp, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        targets = man["models"][comp]["lora_targets"]
        model = cls.from_pretrained(tiny_dir / comp)
        weights = {n: m.weight.detach().numpy() for n, m in model.named_modules()
                   if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        assert set(targets) == set(weights), set(weights) ^ set(targets)
        assert any(t["transpose"] for t in targets.values())
        for name, t in targets.items():
            base = np.asarray(L.read_base(work / "onnx", t))
            want = weights[name].astype(dtype)
            assert np.array_equal(base.T if t["transpose"] else base, want), name
            assert not t.get("shared")
    inits = {i.name for i in onnx.load(str(work / "onnx" / "denoise_step_cfg.onnx"),
                                       load_external_data=False).graph.initializer}
    for step in ("denoise_step_cfg", "denoise_step"):
        assert man["models"][step]["weights_of"] == "unet"
    assert {t["initializer"] for t in man["models"]["unet"]["lora_targets"].values()} <= inits


# ---- parity with diffusers ----------------------------------------------------------------------------

def test_one_lora_matches_diffusers(tiny_dir, tiny_fp32, files):
    loras = [(files["peft"], 0.8)]
    ref = diffusers_lora_image(tiny_dir, loras)
    pipe = Pipeline(tiny_fp32, backend="onnxruntime-cpu", loras=loras)
    img = sdrt_image(pipe)
    base = sdrt_image(Pipeline(tiny_fp32, backend="onnxruntime-cpu"))
    pipe.set_loras([(files["peft"], 0.8 * 0.9)])
    off = sdrt_image(pipe)
    assert psnr(img, ref) >= 50, psnr(img, ref)
    assert psnr(img, base) < 30, psnr(img, base)    # the LoRA changes the image
    assert psnr(off, ref) < 50, psnr(off, ref)      # and the test sees a scale 10 % off


def test_two_loras_match_diffusers(tiny_dir, tiny_fp32, files):
    """A PEFT and a kohya LoRA at different scales (the kohya file loads in diffusers too)."""
    loras = [(files["peft"], 0.7), (files["kohya"], -0.6)]
    ref = diffusers_lora_image(tiny_dir, loras)
    img = sdrt_image(Pipeline(tiny_fp32, backend="onnxruntime-cpu", loras=loras))
    one = sdrt_image(Pipeline(tiny_fp32, backend="onnxruntime-cpu", loras=loras[:1]))
    assert psnr(img, ref) >= 50, psnr(img, ref)
    assert psnr(img, one) < 35, psnr(img, one)


def test_switching_never_accumulates_and_no_lora_is_the_base(tiny_fp32, files):
    pipe = Pipeline(tiny_fp32, backend="onnxruntime-cpu")
    base = sdrt_image(pipe)
    t = pipe.set_loras([(files["peft"], 1.0)])
    a = sdrt_image(pipe)
    assert t["weights"] > 0 and t["merge_ms"] >= 0
    pipe.set_loras([(files["kohya"], 1.0), (files["peft"], 0.5)])
    b = sdrt_image(pipe)
    pipe.set_loras([(files["peft"], 1.0)])
    assert np.array_equal(sdrt_image(pipe), a)       # from the base weights, not from b's
    pipe.set_loras([])
    assert np.array_equal(sdrt_image(pipe), base)    # bit for bit
    assert not np.array_equal(a, b) and not np.array_equal(a, base)


def test_lora_on_an_export_with_the_ort_fused_variant(tiny_fp16, files):
    """The fused graphs (onnx/ort/) have other initializers: LoRA runs the plain graphs, says so,
    and gives what the plain graphs give (FP16 export)."""
    loras = [(files["peft"], 0.8)]
    with pytest.warns(UserWarning, match="LoRA runs the plain graphs"):
        fused = Pipeline(tiny_fp16, backend="onnxruntime-cpu", loras=loras)
    assert fused.backend_name == "onnxruntime-cpu"
    plain = Pipeline(tiny_fp16, backend="onnxruntime-cpu", ort_fusion=False, loras=loras)
    assert np.array_equal(sdrt_image(fused), sdrt_image(plain))


# ---- key layouts --------------------------------------------------------------------------------------

def _merged(work, *paths):
    man = mf.load(work)
    targets = {c: man["models"][c]["lora_targets"] for c in L.COMPONENTS}
    return L.merged_weights(work / "onnx", [(L.resolve(L.load(p), targets), 0.9) for p in paths])


def _same(a: dict, b: dict) -> bool:
    return all(a[c].keys() == b[c].keys() and all(np.array_equal(a[c][k], b[c][k]) for k in a[c]) for c in a)


def test_text_encoder_keys_with_and_without_text_model(tiny_fp32, files, tmp_path):
    mods = files["modules"]
    with_level = _merged(tiny_fp32, files["peft"])
    without = _merged(tiny_fp32, write_peft(tmp_path / "p.safetensors", mods, seed=1, te_prefix=""))
    assert with_level["text_encoder"] and _same(with_level, without)
    k_with = _merged(tiny_fp32, files["kohya"])
    k_without = _merged(tiny_fp32, write_kohya(tmp_path / "k.safetensors", mods, seed=2, te_prefix=""))
    assert k_with["text_encoder"] and _same(k_with, k_without)


def test_older_diffusers_layout(tiny_fp32, files, tmp_path):
    """attn1.processor.to_q_lora.down/up, <module>.lora.down/up, lora_linear_layer (text encoder)."""
    from safetensors.numpy import load_file, save_file
    peft = load_file(str(files["peft"]))
    old = {}
    for key, v in peft.items():
        stem, _, which = key.rpartition(".lora_")
        part = "down" if which == "A.weight" else "up"
        comp, _, name = stem.partition(".")
        head, _, proj = name.rpartition(".")
        if comp == "unet" and proj in ("to_q", "to_k", "to_v"):
            new = f"unet.{head}.processor.{proj}_lora.{part}.weight"
        elif comp == "unet" and name.endswith("to_out.0"):
            new = f"unet.{name[:-len('.0')]}".replace(".to_out", ".processor.to_out_lora") + f".{part}.weight"
        elif comp == "unet":
            new = f"unet.{name}.lora.{part}.weight"
        else:
            new = f"text_encoder.{name}.lora_linear_layer.{part}.weight"
        old[new] = v * (2.0 if part == "up" else 1.0)   # no metadata: α = r, so fold PEFT's α/r = 2 in
    save_file(old, str(tmp_path / "old.safetensors"))
    assert _same(_merged(tiny_fp32, files["peft"]), _merged(tiny_fp32, tmp_path / "old.safetensors"))


def test_kohya_alpha_and_bf16(tiny_fp32, files, tmp_path):
    """ΔW = (α/r)·up·down: α = r (or no alpha key) is the plain product; BF16 files read too."""
    from safetensors.torch import save_file
    import torch
    mods = files["modules"]
    a = _merged(tiny_fp32, write_kohya(tmp_path / "a1.safetensors", mods, seed=3, rank=2, alpha=2.0))
    src = {k: torch.from_numpy(np.asarray(v)) for k, v in
           __import__("safetensors.numpy", fromlist=["load_file"]).load_file(str(tmp_path / "a1.safetensors")).items()
           if not k.endswith(".alpha")}
    save_file(src, str(tmp_path / "noalpha.safetensors"))
    assert _same(a, _merged(tiny_fp32, tmp_path / "noalpha.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in src.items()}, str(tmp_path / "bf16.safetensors"))
    tensors, _ = L.read_safetensors(tmp_path / "bf16.safetensors")
    k = next(iter(src))
    assert np.array_equal(tensors[k], src[k].to(torch.bfloat16).float().numpy())


# ---- bad input ------------------------------------------------------------------------------------------

def test_lora_for_another_architecture(tiny_fp32, files, tmp_path):
    """Wider layers (as SD 2.x vs 1.x) or modules this model lacks: one line with the match count."""
    wide = {c: {n: (s[0] * 2,) + s[1:] for n, s in mods.items()} for c, mods in files["modules"].items()}
    write_peft(tmp_path / "wide.safetensors", wide, seed=1)
    with pytest.raises(UserError, match=r"LoRA .*wide.safetensors: \d+ of \d+ keys match this model"):
        Pipeline(tiny_fp32, backend="onnxruntime-cpu", loras=[(tmp_path / "wide.safetensors", 1.0)])
    from safetensors.numpy import save_file
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": np.zeros((2, 320), np.float32),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": np.zeros((320, 2), np.float32)},
              str(tmp_path / "sgm.safetensors"))
    out = tmp_path / "o.png"
    p = run_cli("generate", tiny_fp32, "x", "--steps", "1", "--height", "64", "--width", "64",
                "--lora", f"{tmp_path / 'sgm.safetensors'}:0.5", "--out", out)
    assert_user_error(p, "0 of 2 keys match", "input_blocks")
    assert not out.exists()


def test_unreadable_lora(tiny_fp32, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    out = tmp_path / "o.png"
    for f, words in (("junk.safetensors", ["cannot read LoRA", "not a safetensors file"]),
                     ("missing.safetensors", ["cannot read LoRA", "missing.safetensors"])):
        p = run_cli("generate", tiny_fp32, "x", "--steps", "1", "--lora", tmp_path / f, "--out", out)
        assert_user_error(p, *words)
    with pytest.raises(UserError, match="scale 'x' is not a finite number"):
        Pipeline(tiny_fp32, backend="onnxruntime-cpu", loras=[(tmp_path / "junk.safetensors", "x")])
    assert not out.exists()


def test_parse_spec():
    assert L.parse_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert L.parse_spec("dir/a.safetensors:0.7") == ("dir/a.safetensors", 0.7)
    assert L.parse_spec("a.safetensors:-1e-1") == ("a.safetensors", -0.1)
    assert L.parse_spec("odd:name.safetensors") == ("odd:name.safetensors", 1.0)


def test_cli_generate_with_loras(tiny_fp32, files, tmp_path):
    out = tmp_path / "img.png"
    p = run_cli("generate", tiny_fp32, "a fox", "--negative", "blurry", "--steps", str(STEPS), "--height", H,
                "--width", W, "--seed", "0", "--lora", f"{files['peft']}:0.7", "--lora", f"{files['kohya']}:-0.6",
                "--backend", "onnxruntime-cpu", "--out", out)
    assert p.returncode == 0, p.stderr
    from PIL import Image
    got = np.asarray(Image.open(out))
    want = Pipeline(tiny_fp32, "onnxruntime-cpu", loras=[(files["peft"], 0.7), (files["kohya"], -0.6)]).generate(
        "a fox", negative="blurry", steps=STEPS, height=H, width=W, seed=0).images[0]
    assert np.array_equal(got, want)


# ---- TensorRT: refit (logic on CPU with stand-ins; the builder part with TensorRT-RTX) -------------

class RecordingBackend:
    """Stands in for a refitting backend (TensorRT): records what set_weights receives."""
    refits = True

    def __init__(self):
        self.calls = []

    def set_weights(self, weights):
        self.calls.append(weights)


def test_refit_restores_the_previous_loras_weights_to_base(tiny_fp32, files, tmp_path):
    """In-place backends get the new merged weights plus the base value of every weight the
    previous LoRA changed and the new one does not: switching never accumulates."""
    man = mf.load(tiny_fp32)
    state, be = L.LoraState(tiny_fp32, man), RecordingBackend()
    # every step variant of the export reads the UNet's weights (the inpainting blend steps too)
    assert state.sources == {"text_encoder": "text_encoder", "denoise_step_cfg": "unet", "denoise_step": "unet",
                             "denoise_step_blend_cfg": "unet", "denoise_step_blend": "unet"}
    state.switch(be, [(files["peft"], 1.0)])
    a = be.calls[-1]
    state.switch(be, [(files["kohya"], 1.0)])
    b = be.calls[-1]
    state.switch(be, [])
    c = be.calls[-1]
    by_init = {t["initializer"]: t for t in man["models"]["unet"]["lora_targets"].values()}
    base = lambda n: L.read_base(tiny_fp32 / "onnx", by_init[n])
    a_names, b_names, c_names = (set(x["denoise_step_cfg"]) for x in (a, b, c))
    kohya = set(L.merged_weights(tiny_fp32 / "onnx", [(L.resolve(L.load(files["kohya"]), state.targets), 1.0)])["unet"])
    only_a = a_names - kohya
    assert only_a and kohya - a_names                # the two LoRAs touch different weights
    assert b_names == kohya | a_names and c_names == kohya
    for n in only_a:                                 # A's weights that B leaves alone: back to base
        assert np.array_equal(b["denoise_step_cfg"][n], base(n))
    for n in c_names:                                # no LoRA: every weight B changed restored
        assert np.array_equal(c["denoise_step_cfg"][n], base(n))
    assert a["denoise_step_cfg"] is a["denoise_step"] and set(a) == set(state.sources)


def test_trt_refit_sets_exactly_the_named_weights(monkeypatch):
    """TrtEngine.refit with a stand-in `tensorrt` module: names checked against the refitter's,
    weights handed over in the initializer's layout and dtype, then refit_cuda_engine."""
    import types
    from sdrt import contract
    from sdrt.engine.tensorrt import TrtEngine
    log = {}

    class Refitter:
        def __init__(self, engine, logger):
            log["engine"] = engine

        def get_all_weights(self):
            return ["onnx::MatMul_1", "m.conv_in.weight"]

        def set_named_weights(self, name, w):
            log.setdefault("set", {})[name] = w.array.copy()
            return True

        def refit_cuda_engine(self):
            log["refit"] = True
            return True

        def get_missing_weights(self):
            return []

    class Weights:
        def __init__(self, a):
            self.array = a

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.Refitter, trt.Weights, trt.Logger = "10.99.0", Refitter, Weights, Logger
    cfg = contract.ModelConfig(text_len=8, text_dim=16, vocab_size=64, sample_size=8)
    engine = types.SimpleNamespace(refittable=True)
    m = TrtEngine(trt, contract.text_encoder(cfg, "fp16"), engine, stream=None)
    w = np.arange(6, dtype=np.float16).reshape(2, 3)
    m.refit({"onnx::MatMul_1": w.T})
    assert log["refit"] and list(log["set"]) == ["onnx::MatMul_1"]
    assert log["set"]["onnx::MatMul_1"].dtype == np.float16 and log["set"]["onnx::MatMul_1"].flags.c_contiguous
    assert np.array_equal(log["set"]["onnx::MatMul_1"], w.T)
    with pytest.raises(UserError, match="no refittable weight 'onnx::Other'.*--refit"):
        m.refit({"onnx::Other": w})
    engine.refittable = False
    with pytest.raises(UserError, match="not refittable.*sdrt build .* --refit"):
        m.refit({"onnx::MatMul_1": w})


needs_rtx = pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt_rtx") is None,
                               reason="tensorrt_rtx not installed (pip install 'sdrt[tensorrt-rtx]')")


@needs_rtx
def test_rtx_refit_build_marks_exactly_the_lora_weights(tiny_fp16, tmp_path, monkeypatch):
    """`sdrt build --refit`: every initializer of the LoRA map is found by name in the parsed
    network and marked refittable (REFIT_INDIVIDUAL); the VAE is not; the key records it."""
    import shutil
    import tensorrt_rtx as trt
    from sdrt.export import build as B
    work = tmp_path / "w"
    shutil.copytree(tiny_fp16, work)
    seen = {}

    def serialize(builder, network, config):   # stands in for the build itself (needs CUDA here)
        seen.setdefault("flag", []).append(config.get_flag(trt.BuilderFlag.REFIT_INDIVIDUAL))
        return b"plan"
    monkeypatch.setattr(B, "_serialize", serialize)
    real = B._make_refittable

    def mark(trt_, network, config, names, model_name):
        real(trt_, network, config, names, model_name)
        seen.setdefault("marked", {})[model_name] = [network.are_weights_marked_refittable(n) for n in names]
    monkeypatch.setattr(B, "_make_refittable", mark)
    B.build(work, "tensorrt-rtx", refit=True, progress=False, inpaint=True)
    man = mf.load(work)
    marked = seen["marked"]
    steps = ("denoise_step_cfg", "denoise_step_blend_cfg")     # the inpainting step shares the UNet's map
    assert set(marked) == {"text_encoder", *steps}
    assert len(marked["text_encoder"]) == len(man["models"]["text_encoder"]["lora_targets"]) and all(marked["text_encoder"])
    for step in steps:
        assert len(marked[step]) == len(man["models"]["unet"]["lora_targets"]) and all(marked[step])
    keys = {n: e["key"]["options"]["refit"] for n, e in man["engines"]["tensorrt-rtx"].items()}
    assert keys == {"text_encoder": True, "denoise_step_cfg": True, "denoise_step_blend_cfg": True,
                    "vae_encoder": False, "vae_decoder": False}
    assert sorted(seen["flag"]) == [False, False, True, True, True]


@needs_rtx
def test_rtx_refit_build_on_this_machine(tiny_fp16, tmp_path):
    """A real refittable build: TensorRT-RTX 1.7 compiles refittable weights with CUDA, so on a
    machine without a GPU it fails with one line that says so (and writes no plan)."""
    import shutil
    from sdrt.engine import cuda
    from sdrt.export import build as B
    work = tmp_path / "w"
    shutil.copytree(tiny_fp16, work)
    if cuda.available():
        pytest.skip("GPU present: the refit build is exercised by test_rtx_refit_runs_on_gpu")
    try:
        B.build(work, "tensorrt-rtx", refit=True, progress=False)
    except UserError as e:
        assert "refittable engines only where a CUDA GPU is present" in str(e)
        assert not list((work / "engines" / "tensorrt-rtx").glob("text_encoder.plan"))
    else:  # a TensorRT-RTX that builds refittable engines on the CPU
        assert mf.load(work)["engines"]["tensorrt-rtx"]["text_encoder"]["key"]["options"]["refit"]


@pytest.mark.gpu
@needs_rtx
def test_rtx_refit_runs_on_gpu(tiny_fp16, tmp_path):
    """On a GPU: the refittable engines' weight names include every mapped initializer, and a
    refit with the merged weights succeeds."""
    import shutil
    from sdrt.engine import cuda
    from sdrt.engine.tensorrt import TensorRT
    from sdrt.engine.engine_keys import check_engine
    from sdrt.export import build as B
    if not cuda.available():
        pytest.skip("needs an NVIDIA GPU")
    if cuda.compute_capability().split(".")[0] in ("9", "10", "11"):
        pytest.skip("TensorRT-RTX does not run on this GPU")
    work = tmp_path / "w"
    shutil.copytree(tiny_fp16, work)
    B.build(work, "tensorrt-rtx", refit=True, progress=False)
    man = mf.load(work)
    be = TensorRT("tensorrt-rtx", cuda.Stream())
    model = mf.models(man)["text_encoder"]
    m = be.load(model, check_engine(work, "tensorrt-rtx", "text_encoder"))
    names = B.refit_names(man, "text_encoder")
    refitter = be.trt.Refitter(m.engine, be.trt.Logger(be.trt.Logger.WARNING))
    assert set(names) <= set(refitter.get_all_weights())
    by_init = {t["initializer"]: t for t in man["models"]["text_encoder"]["lora_targets"].values()}
    m.refit({n: np.array(L.read_base(work / "onnx", by_init[n])) for n in names})
