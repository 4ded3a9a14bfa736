"""LDM text-to-image with LDM-BERT (LDMTextToImagePipeline): the runtime's BERT WordPiece tokenizer
against transformers' BertTokenizer, and sdrt's images against diffusers' pipeline on a small
random-weight folder unlike sdrt's own tiny-ldm-bert (FP32, ONNX Runtime CPU, same latents)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from sdrt.engine.bert_tokenizer import BertTokenizer
from sdrt.engine.conditioning import Conditioning
from sdrt.errors import UserError

LONG = "a painting of a squirrel eating a burger in a small cafe, highly detailed, " * 8
PROMPTS = [
    "a painting of a squirrel eating a burger",
    "",
    "Hello, World!!! ... (masterpiece:1.2), [best] {quality} #art @user $5 100% & more?",
    "In 1984 there were 12,345 cats and 3.14159 dogs",
    "café cafe\u0301 naïve résumé Über façade 日本語のテキスト Москва 🙂🚀 Ａｂｃ",
    "A PAINTING OF A SQUIRREL, UPPERCASE and MiXeD CaSe",
    "   extra   spaces\tand\ttabs\n\nand newlines \x00\x07 control",
    "it's, we're, they'll, I'd -- dashes_and_underscores",
    "unknownwordzzz qqqqq xyzzy supercalifragilistic burgers paintings eating",
    "[CLS] a [SEP] b [PAD] [MASK] [UNK] [cls]",
    LONG,
]
EXTRA_VOCAB = ["café", "naïve", "über", "日", "本", "語", "москва", "##é", "e", "##s"]
CONFIGS = {"default": {}, "cased": {"do_lower_case": False}, "strip_accents": {"strip_accents": True},
           "keep_accents": {"strip_accents": False}, "no_chinese": {"tokenize_chinese_chars": False}}


def tokenizer_folder(path, **config):
    from sdrt.export.ldm_bert import write_tokenizer
    write_tokenizer(path)
    with open(path / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("\n".join(EXTRA_VOCAB + ["Hello", "UPPERCASE"]) + "\n")
    data = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**data, **config}))
    return path


def framed(conditioning: Conditioning, prompt: str) -> list[int]:
    """The first 77-token row the runtime feeds the text encoder for `prompt` (the emphasis syntax off)."""
    return conditioning.chunks(prompt, "plain").ids[0].tolist()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("saved", ["vocab.txt", "tokenizer.json"])
def test_bert_tokenizer_matches_transformers(tmp_path, name, saved):
    """Ids and the [CLS] ... [SEP] [PAD] framing as LDMTextToImagePipeline's tokenizer call makes them
    (padding to 77, truncation), for the hub's layout (vocab.txt) and what transformers 5 saves."""
    from transformers import BertTokenizer as Reference
    folder = tokenizer_folder(tmp_path / "tok", **CONFIGS[name])
    ref = Reference.from_pretrained(folder)
    if saved == "tokenizer.json":
        ref.save_pretrained(tmp_path / "saved")
        folder = tmp_path / "saved"
        assert not (folder / "vocab.txt").exists()
    mine = BertTokenizer.from_dir(folder)
    cond = Conditioning(mine, np.zeros((mine.backend.get_vocab_size(), 2), np.float32), 77)
    for prompt in PROMPTS:
        want = ref(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert framed(cond, prompt) == want, (name, prompt)
        assert mine.token_ids(prompt) == ref(prompt, add_special_tokens=False).input_ids, (name, prompt)
    assert any(ref.unk_token_id in mine.token_ids(p) for p in PROMPTS)     # unknown words were tried
    assert len(mine.token_ids(LONG)) > 75                                  # and a long prompt


def test_bert_tokenizer_bad_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no BERT tokenizer"):
        BertTokenizer.from_dir(empty)
    folder = tokenizer_folder(tmp_path / "tok")
    (folder / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(UserError, match="unknown token"):
        BertTokenizer.from_dir(folder)
    (folder / "vocab.txt").write_text("[UNK]\na\n")
    with pytest.raises(UserError, match="no token '\\[CLS\\]'"):
        BertTokenizer.from_dir(folder)


# ---- parity with diffusers' LDMTextToImagePipeline ------------------------------------------------

# Unlike sdrt's tiny-ldm-bert: BERT 2 layers of width 40 (5 heads of 8), a 2-level UNet with two
# ResNets per level and attention on its first level, an autoencoder of other widths.
SPEC = dict(
    bert=dict(d_model=40, encoder_layers=2, encoder_attention_heads=5, head_dim=8, encoder_ffn_dim=64,
              max_position_embeddings=77),
    unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 48),
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=40, attention_head_dim=4, norm_num_groups=16),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
             block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=16,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
)
PROMPT = "a painting of a squirrel eating a burger"


@pytest.fixture(scope="module")
def ldm_dir(tmp_path_factory):
    from sdrt.export import ldm_bert
    out = tmp_path_factory.mktemp("ldm") / "model"
    ldm_bert.init(out, seed=5, spec=SPEC)
    return out


@pytest.fixture(scope="module")
def ldm_fp32(ldm_dir, tmp_path_factory):
    from sdrt.export.export import export
    return export(ldm_dir, tmp_path_factory.mktemp("work") / "ldm-fp32", precision="fp32")


def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def reference(model_dir, prompt, latents, steps, guidance, height, width, eta=0.0):
    import torch
    from diffusers import LDMTextToImagePipeline
    pipe = LDMTextToImagePipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                  eta=eta, latents=torch.from_numpy(latents), output_type="np").images
    return (images * 255).round().astype(np.uint8)


@pytest.mark.parametrize("guidance,height,width", [(1.0, 64, 64), (6.0, 64, 80)])
def test_matches_diffusers_ldm_text_to_image(ldm_dir, ldm_fp32, guidance, height, width):
    """Same latents, DDIM, the pipeline's guidance (uncond = "" rows first; none at 1.0): PSNR >= 50 dB;
    a changed prompt word fails the comparison."""
    from sdrt.engine.pipeline import Pipeline
    latents = np.random.default_rng(7).standard_normal((1, 4, height // 8, width // 8)).astype(np.float32)
    ref = reference(ldm_dir, PROMPT, latents, 10, guidance, height, width)
    pipe = Pipeline(ldm_fp32, "onnxruntime-cpu")
    got = pipe.generate(PROMPT, steps=10, guidance=guidance, latents=latents, height=height, width=width)
    assert psnr(got.images, ref) >= 50, psnr(got.images, ref)
    other = pipe.generate(PROMPT.replace("squirrel", "dog"), steps=10, guidance=guidance, latents=latents,
                          height=height, width=width)
    assert psnr(other.images, ref) < 50, psnr(other.images, ref)


def test_manifest_and_fp16_export(ldm_dir, ldm_fp32, tmp_path):
    """The export records the BERT text encoder; FP16 exports validate (every graph within tolerance)."""
    from sdrt import manifest as mf
    from sdrt.export.export import export
    man = mf.load(ldm_fp32)
    assert man["config"]["text_encoder"] == "bert" and man["config"]["text_dim"] == 40
    assert man["models"]["text_encoder"]["validation"]["deepest_clip_skip"]["clip_skip"] == 2
    fp16 = export(ldm_dir, tmp_path / "fp16", precision="fp16")
    records = mf.load(fp16)["models"]
    assert all(r["validation"]["rel_l2"] <= r["validation"]["tolerance"] for r in records.values())
    assert records["text_encoder"]["precision"] == "fp16"


def test_emphasis_long_prompts_and_samplers(ldm_fp32):
    """Emphasis changes the image ((word:1.0) does not); a prompt past 75 tokens runs in chunks and
    its tail matters; the other samplers run."""
    from sdrt.engine.pipeline import Pipeline
    pipe = Pipeline(ldm_fp32, "onnxruntime-cpu")
    lat = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    run = lambda p, **kw: pipe.generate(p, steps=4, guidance=1.0, latents=lat, height=64, width=64, **kw).images
    plain = run(PROMPT)
    assert np.array_equal(run(PROMPT.replace("squirrel", "(squirrel:1.0)")), plain)
    assert psnr(run(PROMPT.replace("squirrel", "(squirrel:1.6)")), plain) < 60
    ids = pipe.conditioning(()).chunks(LONG).ids
    assert len(ids) >= 2
    words = LONG.split()
    cut = next(" ".join(words[:n]) for n in range(len(words), 0, -1)
               if len(pipe.tokenizer.token_ids(" ".join(words[:n]))) <= 75)
    assert not np.array_equal(run(LONG), run(cut))
    euler = pipe.generate(PROMPT, steps=4, guidance=1.0, latents=lat, height=64, width=64, sampler="Euler a", seed=1)
    assert euler.images.shape == (1, 64, 64, 3) and euler.images.std() > 0


def test_cli_generate_doctor_memory(tmp_path, ldm_fp32):
    """`sdrt generate` with torch, diffusers and transformers unimportable (the runtime's own
    tokenizer); doctor and memory know the export; a bad --clip-skip is one line."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nfor m in ('torch', 'diffusers', 'transformers'):\n    sys.modules[m] = None\n")
    out = tmp_path / "x.png"
    p = run_cli("generate", ldm_fp32, PROMPT, "--steps", "2", "--guidance", "1", "--height", "64", "--width", "64",
                "--seed", "3", "--backend", "onnxruntime-cpu", "--out", out, env={"PYTHONPATH": str(blocker)})
    assert p.returncode == 0, p.stderr
    assert out.is_file()
    assert_user_error(run_cli("generate", ldm_fp32, PROMPT, "--clip-skip", "3", "--out", tmp_path / "y.png"),
                      "clip")
    assert not (tmp_path / "y.png").exists()
    doctor = run_cli("doctor", ldm_fp32)
    assert doctor.returncode == 0 and "text encoder LDM-BERT" in doctor.stdout, doctor.stdout + doctor.stderr
    memory = run_cli("memory", ldm_fp32, "--sizes", "64x64", "--batches", "1")
    assert memory.returncode == 0 and "64x64" in memory.stdout, memory.stderr


def test_bad_ldm_folders(ldm_dir, tmp_path):
    """A VQModel autoencoder, a missing bert/, a tokenizer that does not fit: one line each (exit 2 from
    the CLI), nothing written."""
    from sdrt.export.export import export
    vq = tmp_path / "vq"
    shutil.copytree(ldm_dir, vq)
    index = json.loads((vq / "model_index.json").read_text())
    (vq / "model_index.json").write_text(json.dumps({**index, "vqvae": ["diffusers", "VQModel"]}))
    assert_user_error(run_cli("export", vq, tmp_path / "w1"), "VQModel", "AutoencoderKL")
    shutil.rmtree(vq / "bert")
    (vq / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="missing its bert/"):
        export(vq, tmp_path / "w2")
    shutil.copytree(ldm_dir / "bert", vq / "bert")
    (vq / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n")
    with pytest.raises(UserError, match="tokens but the text encoder's token table"):
        export(vq, tmp_path / "w3")
    assert not any(tmp_path.glob("w*"))


def test_server_runs_an_ldm_bert_export(ldm_fp32, tmp_path):
    """`sdrt serve` on an LDM-BERT export: the web UI route draws Pipeline.generate's image bit for bit."""
    pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from test_serve import ServeProcess, png

    from sdrt.engine.pipeline import Pipeline
    want = Pipeline(ldm_fp32, "onnxruntime-cpu").generate(PROMPT, steps=4, guidance=6.0, height=64, width=64,
                                                         seed=[5]).images[0]
    server = ServeProcess(ldm_fp32, tmp_path / "serve.log", "--backend", "onnxruntime-cpu")
    try:
        server.wait_ready()
        r = server.http.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 5, "steps": 4, "cfg_scale": 6.0,
                                                        "width": 64, "height": 64})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(png(r.json()["images"][0]), want)
    finally:
        server.stop()


def test_textual_inversion_token_is_its_vector(ldm_fp32, tmp_path):
    """An embedding whose vector is the token table's row of "squirrel": "<my-token>" in a prompt draws
    what "squirrel" draws (the BERT tokenizer learns the added token; the graph takes the vector)."""
    from safetensors.numpy import save_file

    from sdrt.engine.pipeline import Pipeline
    pipe = Pipeline(ldm_fp32, "onnxruntime-cpu")
    row = pipe.token_table[pipe.tokenizer.backend.token_to_id("squirrel")]
    save_file({"<my-token>": row.astype(np.float32)}, str(tmp_path / "learned_embeds.safetensors"))
    lat = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    run = lambda p, **kw: pipe.generate(p, steps=3, guidance=6.0, latents=lat, height=64, width=64, **kw).images
    with_token = run(PROMPT.replace("squirrel", "<my-token>"), embeddings=[str(tmp_path / "learned_embeds.safetensors")])
    np.testing.assert_array_equal(with_token, run(PROMPT))
    assert psnr(run(PROMPT.replace("squirrel", "burger")), with_token) < 50


def test_tensorrt_rtx_builds_the_ldm_bert_engines_on_cpu(ldm_fp32, tmp_path):
    """TensorRT-RTX parses and builds the LDM-BERT text encoder and the other engines (RTX builds
    without a GPU; running them needs one)."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx not installed (pip install 'sdrt[tensorrt-rtx]')")
    from sdrt.export import build as B
    work = tmp_path / "work"
    shutil.copytree(ldm_fp32, work)
    result = B.build(work, "tensorrt-rtx", height=64, width=64, batch=1, progress=False)
    assert {"text_encoder", "denoise_step_cfg", "vae_decoder"} <= set(result["built"])
    assert all((work / "engines" / "tensorrt-rtx" / f"{n}.plan").stat().st_size > 0 for n in result["built"])


def test_long_prompt_matches_diffusers_components(ldm_dir, ldm_fp32):
    """A prompt past 75 tokens against diffusers' own modules: transformers' BertTokenizer ids cut in
    75-token chunks, each framed [CLS] .. [SEP] [PAD].. and encoded by LDMBertModel, concatenated
    along the sequence; the pipeline's loop (UNet, DDIMScheduler.step, guidance 6 against "") and
    its decode. PSNR >= 50 dB."""
    import torch
    from diffusers import LDMTextToImagePipeline

    from sdrt.engine.pipeline import Pipeline
    pipe = LDMTextToImagePipeline.from_pretrained(ldm_dir, dtype=torch.float32)
    tok = pipe.tokenizer

    def encode(text):
        ids = tok(text, add_special_tokens=False).input_ids
        chunks = [ids[i:i + 75] for i in range(0, len(ids), 75)] or [[]]
        rows = [[tok.cls_token_id, *c, tok.sep_token_id] + [tok.pad_token_id] * (75 - len(c)) for c in chunks]
        with torch.no_grad():
            return torch.cat([pipe.bert(torch.tensor([r]))[0] for r in rows], 1), len(rows)

    cond, k = encode(LONG)
    uncond = torch.cat([encode("")[0]] * k, 1)           # the empty prompt, padded to as many chunks
    assert k >= 2
    latents = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    x = torch.from_numpy(latents)
    pipe.scheduler.set_timesteps(6)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            e_u, e_c = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            x = pipe.scheduler.step(e_u + 6.0 * (e_c - e_u), t, x).prev_sample
        image = pipe.vqvae.decode(x / pipe.vqvae.config.scaling_factor).sample
    ref = ((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    got = Pipeline(ldm_fp32, "onnxruntime-cpu").generate(LONG, steps=6, guidance=6.0, latents=latents,
                                                         height=64, width=64, prompt_syntax="plain")
    assert psnr(got.images, ref) >= 50, psnr(got.images, ref)
