"""sdrt init / sdrt export on the tiny pipeline (CPU)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from conftest import assert_user_error, run_cli
from sdrt import manifest as mf
from sdrt.contract import all_models
from sdrt.export.validate import TOLERANCE


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_export_manifest_and_validation(precision, request):
    work = request.getfixturevalue(f"tiny_{precision}")
    data = mf.load(work)
    assert data["precision"] == precision
    expected = all_models(mf.config(data), precision)
    assert set(data["models"]) == set(expected)
    for name, model in expected.items():
        rec = data["models"][name]
        assert rec["contract"] == model.to_json()          # every input/output described
        assert rec["validation"]["rel_l2"] <= TOLERANCE[precision]
        assert rec["validation"]["tolerance"] == TOLERANCE[precision]
        path = work / "onnx" / model.onnx
        assert rec["sha256"] == mf.files_sha256(mf.model_files(work, data, name))
        assert rec["bytes"] == sum(p.stat().st_size for p in mf.model_files(work, data, name))
        assert rec["files"][0] == model.onnx
        proto = onnx.load(str(path), load_external_data=False)
        assert [i.name for i in proto.graph.input] == [t.name for t in model.inputs]
        assert [o.name for o in proto.graph.output] == [t.name for t in model.outputs]
        assert proto.opset_import[0].version >= 17
    assert (work / "tokenizer").is_dir()
    assert json.loads((work / "scheduler" / "scheduler_config.json").read_text())["beta_end"] == 0.012
    assert set(data["versions"]) >= {"torch", "diffusers", "onnx", "onnxruntime", "sdrt"}
    assert set(data["source"]["sha256"]) == {"tokenizer", "text_encoder", "unet", "vae", "scheduler"}


def test_fp16_graph_is_strongly_typed_fp16(tiny_fp16):
    """Every weight of size is FP16 in the graph itself: TensorRT 11 builds it as typed."""
    for name in ("text_encoder", "unet", "vae_decoder"):
        proto = onnx.load(str(tiny_fp16 / "onnx" / f"{name}.onnx"))
        big = [t for t in proto.graph.initializer if np.prod(t.dims) >= 256]
        assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big), name
        assert {n.op_type for n in proto.graph.node} >= {"MatMul"}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_token_table_and_text_encoder_inputs(precision, request, tiny_dir):
    """The text encoder takes token embeddings; its table is written beside it, in the export's
    precision, and the graph holds no vocabulary-sized weight (new tokens need no new graph)."""
    import torch
    from transformers import CLIPTextModel
    work = request.getfixturevalue(f"tiny_{precision}")
    data = mf.load(work)
    rec = data["token_embedding"]
    table = np.load(work / rec["file"])
    te = CLIPTextModel.from_pretrained(tiny_dir / "text_encoder")
    ref = te.get_input_embeddings().weight.detach().numpy()
    assert table.dtype.name == rec["dtype"] == ("float16" if precision == "fp16" else "float32")
    assert list(table.shape) == rec["shape"] == list(ref.shape)
    np.testing.assert_array_equal(table, ref.astype(table.dtype))
    assert rec["sha256"] == mf.sha256_file(work / rec["file"])
    proto = onnx.load(str(work / "onnx" / "text_encoder.onnx"))
    assert all(ref.shape[0] not in t.dims for t in proto.graph.initializer)
    assert any(t.name.startswith("m.encoder.layers.0.") for t in proto.graph.initializer)   # weights keep their names
    skip = data["models"]["text_encoder"]["validation"]["deepest_clip_skip"]
    assert skip["clip_skip"] == mf.config(data).text_layers and skip["rel_l2"] <= TOLERANCE[precision]


def test_text_encoder_module_is_clip_with_clip_skip(tiny_dir):
    """The exported module: CLIPTextModel on looked-up tokens; clip skip N = final layer norm of
    hidden_states[-N] (transformers' own hidden states)."""
    import torch
    from transformers import CLIPTextModel
    from sdrt.export import pipeline_folder, to_onnx
    folder = pipeline_folder.load(tiny_dir)
    module = to_onnx.wrap("text_encoder", folder)
    te = CLIPTextModel.from_pretrained(tiny_dir / "text_encoder", attn_implementation="eager")
    ids = torch.randint(0, 998, (3, 77))
    embeds = te.get_input_embeddings()(ids)
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        for skip in range(1, folder.config.text_layers + 1):
            got = module(embeds, torch.tensor([skip], dtype=torch.int32))
            want = te.final_layer_norm(out.hidden_states[-skip])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module(embeds, torch.tensor([1], dtype=torch.int32)), out.last_hidden_state)


def test_step_graph_shares_unet_weights(tiny_fp16):
    """The denoise-step graphs point at unet.onnx.data instead of copying the weights."""
    proto = onnx.load(str(tiny_fp16 / "onnx" / "denoise_step_cfg.onnx"), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"unet.onnx.data"}
    assert (tiny_fp16 / "onnx" / "denoise_step_cfg.onnx").stat().st_size < 2 * (tiny_fp16 / "onnx" / "unet.onnx").stat().st_size


def test_ort_fusion_variant(tiny_fp16):
    """onnx/ort/: ORT's attention fusion (NumPy-2 crash mended), validated like the rest."""
    data = mf.load(tiny_fp16)
    variant = data["variants"]["ort"]
    assert set(variant) == {"unet", "denoise_step_cfg", "denoise_step", "denoise_step_blend_cfg", "denoise_step_blend"}
    assert variant["unet"]["fused_ops"]["MultiHeadAttention"] >= 4
    for name, rec in variant.items():
        assert rec["validation"]["rel_l2"] <= TOLERANCE["fp16"]
        assert rec["files"][0] == f"ort/{name}.onnx" and rec["files"][1:] == ["ort/unet.onnx.data"]
        assert rec["sha256"] == mf.files_sha256([tiny_fp16 / "onnx" / f for f in rec["files"]])
    proto = onnx.load(str(tiny_fp16 / "onnx" / "ort" / "denoise_step_cfg.onnx"), load_external_data=False)
    assert any(n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft" for n in proto.graph.node)
    assert [i.name for i in proto.graph.input] == [t.name for t in all_models(mf.config(data), "fp16")["denoise_step_cfg"].inputs]
    assert not (tiny_fp16 / "onnx" / "ort" / "fp32").exists()     # the FP32 source is not kept


def _attention_modules(tiny_dir) -> dict:
    """How many attention layers the tiny UNet and VAE have (diffusers' Attention modules)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import Attention
    count = lambda m: sum(isinstance(x, Attention) for x in m.modules())
    return {"unet": count(UNet2DConditionModel.from_pretrained(tiny_dir / "unet")),
            "vae_decoder": count(AutoencoderKL.from_pretrained(tiny_dir / "vae").decoder)}


def test_attention_forms(tiny_dir, tiny_fp32, tiny_fp32_decomposed):
    """--attention op (default): one ONNX Attention node per attention layer, opset 23, no Softmax
    left; --attention decomposed: torch's MatMul/Softmax/MatMul at opset 18."""
    layers = _attention_modules(tiny_dir)
    op, dec = mf.load(tiny_fp32), mf.load(tiny_fp32_decomposed)
    assert (op["attention"], op["opset"], dec["attention"], dec["opset"]) == ("op", 23, "decomposed", 18)
    for name, n in layers.items():
        assert n > 0
        assert op["models"][name]["attention_ops"] == {"Attention": n, "Softmax": 0}
        assert dec["models"][name]["attention_ops"] == {"Attention": 0, "Softmax": n}
        for work, version in ((tiny_fp32, 23), (tiny_fp32_decomposed, 18)):
            path = work / "onnx" / f"{name}.onnx"
            proto = onnx.load(str(path), load_external_data=False)
            assert {(o.domain, o.version) for o in proto.opset_import} == {("", version)}
            onnx.checker.check_model(str(path), full_check=True)
    step = onnx.load(str(tiny_fp32 / "onnx" / "denoise_step_cfg.onnx"), load_external_data=False)
    assert sum(n.op_type == "Attention" for n in step.graph.node) == layers["unet"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch's notice on its TorchScript exporter
def test_attention_op_tracing_leaves_torch_as_it_was():
    """The Attention symbolic is registered only while tracing: torch's own SDPA export is back after."""
    import torch
    from sdrt.export import attention
    f = lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q)
    q = torch.randn(1, 2, 4, 8)
    class M(torch.nn.Module):
        def forward(self, q):
            return f(q)
    import io
    for form, op in (("op", "Attention"), ("decomposed", "Softmax"), ("op", "Attention"), ("decomposed", "Softmax")):
        buf = io.BytesIO()
        with attention.attention_form(form):
            torch.onnx.export(M(), (q,), buf, dynamo=False, opset_version=20)
        ops = {n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node}
        assert op in ops and ({"Attention", "Softmax"} - {op}).isdisjoint(ops), (form, ops)


def _save_with_diffusers(path, tokenizer_form):
    """A folder written by diffusers' own save_pretrained, with PNDM as SD 1.5 ships it."""
    from diffusers import PNDMScheduler
    from sdrt.export.init_models import SD15_SCHEDULER, build_pipeline
    pipe = build_pipeline("tiny", seed=3)
    pipe.scheduler = PNDMScheduler(**{k: v for k, v in SD15_SCHEDULER.items()
                                      if k in ("num_train_timesteps", "beta_start", "beta_end",
                                               "beta_schedule", "steps_offset", "set_alpha_to_one")})
    pipe.save_pretrained(path)
    tok = path / "tokenizer"
    from sdrt.export.clip_vocab import write_tokenizer_json
    if tokenizer_form == "vocab":
        if not (tok / "vocab.json").exists():  # transformers 5 saves tokenizer.json only
            from sdrt.export.clip_vocab import write_clip_tokenizer
            write_clip_tokenizer(tok, 1000)
        (tok / "tokenizer.json").unlink(missing_ok=True)
    else:
        if not (tok / "tokenizer.json").exists():
            write_tokenizer_json(tok)
        for f in ("vocab.json", "merges.txt"):
            (tok / f).unlink(missing_ok=True)


@pytest.mark.parametrize("form", ["vocab", "json"])
def test_export_diffusers_saved_folder(form, tmp_path):
    from diffusers import StableDiffusionPipeline
    from sdrt.export.export import export
    src = tmp_path / "saved"
    _save_with_diffusers(src, form)
    StableDiffusionPipeline.from_pretrained(src)  # diffusers itself loads it
    work = export(src, tmp_path / "work", precision="fp32")
    assert sorted(p.name for p in (work / "tokenizer").iterdir())
    assert mf.load(work)["models"]["unet"]["validation"]["rel_l2"] < TOLERANCE["fp32"]


def test_init_sd15_shapes_without_weights():
    """sd15 has SD 1.5's exact shapes: 859.52 M UNet parameters, CLIP ViT-L/14, VAE factor 8."""
    import torch
    from diffusers import UNet2DConditionModel
    from sdrt.export.init_models import ARCHS
    spec = ARCHS["sd15"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec["unet"])
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert spec["vocab_size"] == 49408 and spec["text"]["max_position_embeddings"] == 77
    assert spec["text"]["hidden_size"] == 768 and spec["text"]["num_hidden_layers"] == 12
    assert len(spec["vae"]["block_out_channels"]) == 4 and spec["vae"]["latent_channels"] == 4


# ---- bad input: one clear line, exit 2, no traceback, nothing half-written ----

def test_export_not_a_pipeline_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli("export", tmp_path / "empty", tmp_path / "w"), "model_index.json")
    assert_user_error(run_cli("export", tmp_path / "nope", tmp_path / "w"), "not a folder")
    assert not (tmp_path / "w").exists()


def test_export_missing_component(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "vae")
    assert_user_error(run_cli("export", broken, tmp_path / "w"), "missing", "vae")
    assert not (tmp_path / "w").exists()


def test_export_sdxl_is_refused(tiny_dir, tmp_path):
    xl = tmp_path / "xl"
    shutil.copytree(tiny_dir, xl)
    index = json.loads((xl / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (xl / "model_index.json").write_text(json.dumps(index))
    assert_user_error(run_cli("export", xl, tmp_path / "w"), "SDXL")


def test_export_refuses_foreign_output_folder(tiny_dir, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_user_error(run_cli("export", tiny_dir, out), "not a previous sdrt export")
    assert (out / "notes.txt").read_text() == "keep me"


def test_export_over_a_previous_export_needs_force(tiny_dir, tmp_path):
    """As init and train-demo: an existing export (built engines, the user's files) is replaced
    only with --force."""
    from sdrt.export.export import export
    work = export(tiny_dir, tmp_path / "w", precision="fp32")
    (work / "engines").mkdir()
    (work / "engines" / "mine.plan").write_text("built")
    p = run_cli("export", tiny_dir, work, "--precision", "fp32")
    assert_user_error(p, "already holds an export", "--force")
    assert (work / "engines" / "mine.plan").read_text() == "built"
    p = run_cli("export", tiny_dir, work, "--precision", "fp32", "--force")
    assert p.returncode == 0, p.stderr
    assert not (work / "engines").exists() and (work / "manifest.json").is_file()


def test_export_files_are_readable_by_others(tiny_fp32, tiny_fp16):
    """Every file of an export has the usual mode (0666 less the umask, as fileio writes), the
    external weights included (onnx writes them 0600): a service user can read a shared folder."""
    import os
    import stat
    umask = os.umask(0)
    os.umask(umask)
    for work in (tiny_fp32, tiny_fp16):
        files = [p for p in work.rglob("*") if p.is_file()]
        assert any(p.name.endswith(".onnx.data") for p in files)
        for p in files:
            assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


def test_export_unwritable_path(tiny_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(run_cli("export", tiny_dir, blocker / "sub" / "w"), "cannot write")


def test_failed_export_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    from sdrt.errors import UserError
    from sdrt.export import export as ex
    def boom(*a, **k):
        raise UserError("validation failed on purpose")
    monkeypatch.setattr(ex.validate, "check", boom)
    with pytest.raises(UserError):
        ex.export(tiny_dir, tmp_path / "w", precision="fp32")
    assert list(tmp_path.iterdir()) == []


def test_opset_23_declaration_covers_every_changed_op(tiny_fp32, tiny_fp16):
    """Traced at 20, declared 23: every op of the graphs whose schema changed in between must be
    one known to have changed by new types only (attention.CHANGED_20_TO_23)."""
    import onnx.defs
    from sdrt.export import attention
    for work in (tiny_fp32, tiny_fp16):
        for path in (work / "onnx").glob("*.onnx"):
            ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node if not n.domain}
            changed = {op for op in ops - {"Attention"}
                       if onnx.defs.get_schema(op, 20).since_version != onnx.defs.get_schema(op, 23).since_version}
            assert changed <= attention.CHANGED_20_TO_23, (path.name, changed - attention.CHANGED_20_TO_23)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_non_4d_attention_falls_back_to_torch(tmp_path):
    """SDPA on 3-D tensors is not SD's form: exported as torch decomposes it, and still correct."""
    import io
    import onnxruntime as ort
    import torch
    from sdrt.export import attention
    class M(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)
    q = torch.randn(2, 5, 8)
    buf = io.BytesIO()
    with attention.attention_form("op"):
        torch.onnx.export(M(), (q,), buf, dynamo=False, opset_version=20)
    proto = onnx.load_from_string(buf.getvalue())
    assert "Attention" not in {n.op_type for n in proto.graph.node}
    got = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"]).run(None, {proto.graph.input[0].name: q.numpy()})[0]
    assert np.allclose(got, M()(q).numpy(), atol=1e-5)


@pytest.mark.parametrize("args, words", [
    (["--attention", "op", "--opset", "18"], ["--attention op needs --opset 23", "decomposed"]),
    (["--attention", "op", "--opset", "24"], ["--attention op needs --opset 23"]),
    (["--attention", "decomposed", "--opset", "23"], ["17 to 20"]),
    (["--attention", "flash"], ["unknown --attention", "decomposed"]),
    (["--attention", "decomposed", "--opset", "16"], ["too old"]),
])
def test_export_bad_attention_options(tiny_dir, tmp_path, args, words):
    assert_user_error(run_cli("export", tiny_dir, tmp_path / "w", *args), *words)
    assert not (tmp_path / "w").exists()


def test_init_refuses_existing_and_unknown_arch(tmp_path):
    (tmp_path / "x").mkdir()
    assert_user_error(run_cli("init", tmp_path / "x", "--arch", "tiny"), "already exists")
    from sdrt.errors import UserError
    from sdrt.export.init_models import init
    with pytest.raises(UserError, match="unknown --arch"):
        init(tmp_path / "y", "sdxl")
