"""sdrt.export.build and sdrt.engine.engine_keys: ONNX -> TensorRT-RTX engines on a CPU, engine
keys, staleness, failures.

The work dir is a fake but valid export: tiny fp16 graphs with the contract's I/O (names, dtypes,
ranks) for text_encoder, vae_decoder and denoise_step_cfg, plus a manifest. The step graph keeps its
weight in "unet.onnx.data", as the real composed step points at the UNet's external data.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdrt import contract, manifest as mf
from sdrt.engine import engine_keys as EC
from sdrt.errors import UserError
from sdrt.fileio import write_json_atomic
from sdrt.export import build as B
from sdrt.export.export import external_data_locations

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx not installed (pip install 'sdrt[tensorrt-rtx]')")

CFG = contract.ModelConfig(text_len=8, text_dim=16, vocab_size=64, latent_channels=4,
                           vae_factor=8, sample_size=8)  # native size 64 px, latents 8x8
RTX = "tensorrt-rtx"


# ---- fake export -------------------------------------------------------------------------------

def _graph_io(model: contract.Model):
    from onnx import helper, TensorProto
    types = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int32": TensorProto.INT32}
    vi = lambda t: helper.make_tensor_value_info(t.name, types[t.dtype], list(t.shape))
    return [vi(t) for t in model.inputs], [vi(t) for t in model.outputs]


def _save(model: contract.Model, nodes, inits, path: Path, external: str | None = None):
    import onnx
    from onnx import helper
    ins, outs = _graph_io(model)
    graph = helper.make_graph(nodes, model.name, ins, outs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    if external:
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external, size_threshold=0)
    else:
        onnx.save_model(m, str(path))


def write_text_encoder(onnx_dir: Path, seed: int = 0):
    from onnx import helper, numpy_helper
    from onnx import TensorProto
    m = contract.text_encoder(CFG, "fp16")
    scale = np.random.default_rng(seed).standard_normal(CFG.text_dim).astype(np.float16)
    nodes = [helper.make_node("Mul", ["inputs_embeds", "scale"], ["scaled"]),   # embeddings x scale + clip_skip
             helper.make_node("Cast", ["clip_skip"], ["skip16"], to=TensorProto.FLOAT16),
             helper.make_node("Add", ["scaled", "skip16"], ["text_embeddings"])]
    _save(m, nodes, [numpy_helper.from_array(scale, "scale")], onnx_dir / m.onnx,
          external="text_encoder.onnx.data")


def write_vae_decoder(onnx_dir: Path):
    from onnx import helper, numpy_helper, TensorProto
    m = contract.vae_decoder(CFG, "fp16")
    f = CFG.vae_factor
    w = np.random.default_rng(1).standard_normal((3 * f * f, CFG.latent_channels, 1, 1)).astype(np.float16)
    nodes = [helper.make_node("Cast", ["latents"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("Conv", ["x16", "w"], ["c"]),
             helper.make_node("DepthToSpace", ["c"], ["img16"], blocksize=f, mode="DCR"),
             helper.make_node("Cast", ["img16"], ["image"], to=TensorProto.FLOAT)]
    _save(m, nodes, [numpy_helper.from_array(w, "w")], onnx_dir / m.onnx)


def write_step(onnx_dir: Path, guidance: bool = True):
    """latents_next = (latents * scale * step_table[step_index[b]][1] + mean(emb)), step_index + 1,
    x0_next = latents + step_noise[b, 0] * 0 + x0_prev * 0 (the sampler state passed through)."""
    from onnx import helper, numpy_helper, TensorProto
    m = contract.denoise_step(CFG, "fp16", guidance)
    scale = np.linspace(0.5, 1.0, CFG.latent_channels, dtype=np.float16).reshape(-1, 1, 1)
    const = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(v, name))
    inits = [numpy_helper.from_array(scale, "scale")]  # the only external weight
    nodes = [const("one", np.array([1], np.int32)), const("c0", np.array([1], np.int64)),
             const("c1", np.array([2], np.int64)), const("ax", np.array([1], np.int64)),
             const("ax23", np.array([2, 3], np.int64)), const("zero_f", np.array([0], np.float32)),
             const("first", np.array([0], np.int64)),
             helper.make_node("Gather", ["step_table", "step_index"], ["row2"], axis=0),  # [B, columns]
             helper.make_node("Unsqueeze", ["row2", "ax23"], ["row"]),                   # [B, columns, 1, 1]
             helper.make_node("Slice", ["row", "c0", "c1", "ax"], ["coef"]),             # [B, 1, 1, 1]
             helper.make_node("Cast", ["coef"], ["coef16"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["latents"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("Mul", ["x16", "scale"], ["xs"]),
             helper.make_node("Mul", ["xs", "coef16"], ["xc"]),
             helper.make_node("ReduceMean", ["text_embeddings"], ["emb_mean"], keepdims=0),
             helper.make_node("Add", ["xc", "emb_mean"], ["y16"]),
             helper.make_node("Cast", ["y16"], ["latents_next"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["step_index", "one"], ["step_index_next"]),
             helper.make_node("Gather", ["step_noise", "first"], ["z1"], axis=1),        # [B, 1, C, h, w]
             helper.make_node("ReduceSum", ["z1", "c0"], ["z"], keepdims=0),             # [B, C, h, w]
             helper.make_node("Mul", ["z", "zero_f"], ["z0"]),
             helper.make_node("Mul", ["x0_prev", "zero_f"], ["p0"]),
             helper.make_node("Add", ["latents", "z0"], ["x0a"]),
             helper.make_node("Add", ["x0a", "p0"], ["x0_next"])]
    _save(m, nodes, inits, onnx_dir / m.onnx, external="unet.onnx.data")


def make_export(work: Path) -> Path:
    """WORK_DIR as `sdrt export` writes it (the parts the builder reads)."""
    onnx_dir = work / "onnx"
    onnx_dir.mkdir(parents=True)
    write_text_encoder(onnx_dir)
    write_vae_decoder(onnx_dir)
    write_step(onnx_dir, guidance=True)
    models = {m.name: m for m in (contract.text_encoder(CFG, "fp16"), contract.vae_decoder(CFG, "fp16"),
                                  contract.denoise_step(CFG, "fp16", True))}
    files = {n: [m.onnx] + external_data_locations(onnx_dir / m.onnx) for n, m in models.items()}
    write_json_atomic(work / mf.NAME, {
        "format": mf.FORMAT, "precision": "fp16", "config": CFG.to_json(),
        "models": {n: {"contract": m.to_json(), "files": files[n],
                       "sha256": mf.files_sha256([onnx_dir / f for f in files[n]])}
                   for n, m in models.items()}})
    return work


def _manifest(work: Path) -> dict:
    return json.loads((work / mf.NAME).read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One export with RTX engines built at the static native profile (shared, read only)."""
    if not HAS_RTX:
        pytest.skip("tensorrt_rtx not installed")
    work = make_export(tmp_path_factory.mktemp("built") / "work")
    result = B.build(work, RTX)
    return work, result


@pytest.fixture
def work(built, tmp_path):
    """A private copy of the built work dir, to change."""
    dst = tmp_path / "work"
    shutil.copytree(built[0], dst)
    return dst


def _plans(work: Path) -> list[str]:
    return sorted(p.name for p in (work / "engines" / RTX).iterdir())


# ---- building ----------------------------------------------------------------------------------

@needs_rtx
def test_rtx_builds_all_runtime_models_on_cpu(built):
    work, result = built
    names = ["text_encoder", "denoise_step_cfg", "vae_decoder"]
    assert sorted(result["built"]) == sorted(names) and result["up_to_date"] == []
    assert _plans(work) == sorted(f"{n}.plan" for n in names)  # no temp files left over
    for n in names:
        assert (work / "engines" / RTX / f"{n}.plan").stat().st_size > 0


@needs_rtx
def test_manifest_records_engine_keys(built):
    import tensorrt_rtx
    work, _ = built
    engines = _manifest(work)["engines"][RTX]
    for name, entry in engines.items():
        assert entry["file"] == f"engines/{RTX}/{name}.plan"
        assert entry["size_bytes"] == (work / entry["file"]).stat().st_size
        assert entry["build_s"] >= 0
        key = entry["key"]
        assert set(key) == set(EC.KEY_FIELDS)
        assert key["backend"] == RTX and key["trt_version"] == tensorrt_rtx.__version__
        assert key["gpu_name"] and key["compute_capability"]  # portable RTX targets, no GPU here
        text = {"max_prompt_chunks": 3} if name != "vae_decoder" else {}   # models that take text
        assert key["options"] == {"opt_level": None, "precision": "fp16", "strongly_typed": True,
                                  "workspace_mb": None, "require_user_allocation": True, "refit": False, **text}
        model = mf.models(_manifest(work))[name]
        assert key["onnx_sha256"] == mf.files_sha256(mf.model_files(work, _manifest(work), name))
        assert set(key["profile"]) == {t.name for t in model.inputs}
    # static native profile: 64 px, batch 1; guidance doubles the text batch
    # prompts of 1..3 chunks (--max-prompt-chunks 3): 3 encoder rows per text row, 3 * 8 tokens
    te = engines["text_encoder"]["key"]["profile"]
    assert te["inputs_embeds"] == {"min": [2, 8, 16], "opt": [2, 8, 16], "max": [6, 8, 16]}
    assert te["clip_skip"] == {"min": [1], "opt": [1], "max": [1]}
    step = engines["denoise_step_cfg"]["key"]["profile"]
    assert step["latents"]["opt"] == [1, 4, 8, 8]
    assert step["text_embeddings"] == {"min": [2, 8, 16], "opt": [2, 8, 16], "max": [2, 24, 16]}
    assert step["step_table"] == {k: [contract.STEP_TABLE_ROWS, len(contract.STEP_COLUMNS)]
                                  for k in ("min", "opt", "max")}
    assert step["step_index"]["min"] == [1]                      # [batch]: a row per sample
    assert step["step_noise"]["min"][1] == 1 and step["step_noise"]["max"][1] == contract.STEP_TABLE_ROWS
    # the step graph's weights live in the UNet's data file: part of its hash
    assert [p.name for p in mf.model_files(work, _manifest(work), "denoise_step_cfg")] == \
        ["denoise_step_cfg.onnx", "unet.onnx.data"]


@needs_rtx
def test_second_build_is_up_to_date(work, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (work / "engines" / RTX).iterdir()}
    result = B.build(work, RTX)
    assert result["built"] == [] and len(result["up_to_date"]) == 3
    assert "up to date" in capsys.readouterr().err
    assert before == {p.name: p.stat().st_mtime_ns for p in (work / "engines" / RTX).iterdir()}
    assert EC.check_engine(work, RTX, "vae_decoder") == work / "engines" / RTX / "vae_decoder.plan"


@needs_rtx
def test_changed_onnx_is_stale_then_rebuilt(work):
    write_text_encoder(work / "onnx", seed=7)  # new weights in text_encoder.onnx.data
    with pytest.raises(UserError, match=r"engine text_encoder is stale: onnx_sha256 changed \(built "
                                        r"from \w+…, export has \w+…\); run `sdrt build"):
        EC.check_engine(work, RTX, "text_encoder")
    EC.check_engine(work, RTX, "vae_decoder")  # the others still hold
    result = B.build(work, RTX)
    assert result["built"] == ["text_encoder"]
    EC.check_engine(work, RTX, "text_encoder")


@needs_rtx
def test_shared_external_data_change_is_stale(work):
    data = work / "onnx" / "unet.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0x01  # flip a bit of a weight
    data.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="denoise_step_cfg is stale: onnx_sha256 changed"):
        EC.check_engine(work, RTX, "denoise_step_cfg")
    assert B.build(work, RTX, progress=False)["built"] == ["denoise_step_cfg"]


@needs_rtx
def test_other_trt_version_is_stale_then_rebuilt(work):
    man = _manifest(work)
    man["engines"][RTX]["vae_decoder"]["key"]["trt_version"] = "0.9.0"
    write_json_atomic(work / mf.NAME, man)
    with pytest.raises(UserError, match=r"vae_decoder is stale: trt_version changed \(built for 0\.9\.0"):
        EC.check_engine(work, RTX, "vae_decoder")
    assert B.build(work, RTX, progress=False)["built"] == ["vae_decoder"]
    EC.check_engine(work, RTX, "vae_decoder")


@needs_rtx
def test_check_engine_profile(work):
    man = _manifest(work)
    model = mf.models(man)["denoise_step_cfg"]
    shapes = model.shapes(contract.Dims(1, 64, 64, vae_factor=8, chunks=3, text_len=CFG.text_len))
    fits = {t.name: shapes[t.name] for t in model.inputs}
    EC.check_engine(work, RTX, "denoise_step_cfg", fits)
    exact = man["engines"][RTX]["denoise_step_cfg"]["key"]["profile"]
    EC.check_engine(work, RTX, "denoise_step_cfg", exact)
    with pytest.raises(UserError, match=r"stale: profile does not cover latents \[2, 4, 8, 8\]"):
        EC.check_engine(work, RTX, "denoise_step_cfg", {**fits, "latents": (2, 4, 8, 8)})
    other = B.profile_for(model, B.parse_dynamic("height=64:64:128", 1, 64, 64, 8), True, 8, 3, CFG.text_len)
    with pytest.raises(UserError, match="stale: profile changed for latents"):
        EC.check_engine(work, RTX, "denoise_step_cfg", other)


@needs_rtx
def test_dynamic_profile_build_and_rebuild(work):
    result = B.build(work, RTX, dynamic="batch=1:1:2,height=64:64:128", opt_level=2,
                     workspace_mb=64, progress=False)
    assert sorted(result["built"]) == ["denoise_step_cfg", "text_encoder", "vae_decoder"]
    key = _manifest(work)["engines"][RTX]["denoise_step_cfg"]["key"]
    assert key["profile"]["latents"] == {"min": [1, 4, 8, 8], "opt": [1, 4, 8, 8], "max": [2, 4, 16, 8]}
    assert key["profile"]["text_embeddings"]["max"] == [4, 24, 16]
    assert key["options"]["opt_level"] == 2 and key["options"]["workspace_mb"] == 64
    assert _plans(work) == ["denoise_step_cfg.plan", "text_encoder.plan", "vae_decoder.plan"]


@needs_rtx
def test_max_prompt_chunks_is_in_the_key(work):
    """Another --max-prompt-chunks changes the text encoder and step profiles: both are rebuilt,
    the VAE is up to date."""
    result = B.build(work, RTX, max_prompt_chunks=2, progress=False)
    assert sorted(result["built"]) == ["denoise_step_cfg", "text_encoder"]
    assert result["up_to_date"] == ["vae_decoder"]
    key = _manifest(work)["engines"][RTX]["denoise_step_cfg"]["key"]
    assert key["options"]["max_prompt_chunks"] == 2
    assert key["profile"]["text_embeddings"]["max"] == [2, 16, 16]


@needs_rtx
def test_guidance_off_needs_denoise_step(work):
    with pytest.raises(UserError, match="has no denoise_step model"):
        B.build(work, RTX, guidance=False)


@needs_rtx
def test_progress_output(tmp_path, capsys):
    work = make_export(tmp_path / "w")
    B.build(work, RTX, timing_cache=tmp_path / "tc.bin")
    err = capsys.readouterr().err
    assert "building text_encoder" in err and "text_encoder: done in" in err and " MB" in err
    assert "Building engine" in err  # the builder's progress monitor
    assert "timing cache" in err and not (tmp_path / "tc.bin").exists()  # RTX has none


# ---- failures -----------------------------------------------------------------------------------

@needs_rtx
def test_failed_build_leaves_no_plan(tmp_path, monkeypatch):
    work = make_export(tmp_path / "w")
    monkeypatch.setattr(B, "_serialize", lambda *a: None)
    with pytest.raises(UserError, match=r"building text_encoder failed .*lower --workspace"):
        B.build(work, RTX, progress=False)
    assert list((work / "engines" / RTX).iterdir()) == []
    assert "engines" not in _manifest(work)


@needs_rtx
def test_failed_rebuild_keeps_old_plan_and_reports_stale(work, monkeypatch):
    plan = work / "engines" / RTX / "text_encoder.plan"
    old = plan.read_bytes()
    write_text_encoder(work / "onnx", seed=3)

    def boom(*a):
        raise MemoryError("out of memory")
    monkeypatch.setattr(B, "_serialize", boom)
    with pytest.raises(UserError, match="out of memory"):
        B.build(work, RTX, progress=False)
    assert plan.read_bytes() == old and not [p for p in plan.parent.iterdir() if p.suffix == ".tmp"]
    with pytest.raises(UserError, match="onnx_sha256 changed"):
        EC.check_engine(work, RTX, "text_encoder")


@needs_rtx
def test_corrupt_onnx_reports_parser_error(tmp_path):
    work = make_export(tmp_path / "w")
    (work / "onnx" / "vae_decoder.onnx").write_bytes(b"\x08\x07\x12\x03abc" + b"\xff" * 20)
    with pytest.raises(UserError) as e:
        B.build(work, RTX, progress=False)
    assert "vae_decoder.onnx" in str(e.value) and "\n" not in str(e.value)


@needs_rtx
def test_parser_error_is_one_line(tmp_path):
    work = make_export(tmp_path / "w")
    (work / "onnx" / "vae_decoder.onnx").write_bytes(b"garbage, not protobuf")
    with pytest.raises(UserError, match=r"vae_decoder.onnx.*export again") as e:
        B.build(work, RTX, progress=False)
    assert "\n" not in str(e.value)


@needs_rtx
def test_contract_mismatch(tmp_path):
    work = make_export(tmp_path / "w")
    man = _manifest(work)
    man["models"]["vae_decoder"]["contract"]["outputs"][0]["name"] = "pixels"
    write_json_atomic(work / mf.NAME, man)
    with pytest.raises(UserError, match="does not match the vae_decoder contract"):
        B.build(work, RTX, progress=False)


def test_missing_export(tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        B.build(tmp_path, RTX)
    with pytest.raises(UserError, match="not a folder"):
        B.build(tmp_path / "nope", RTX)
    work = make_export(tmp_path / "w")
    (work / "onnx" / "vae_decoder.onnx").unlink()
    with pytest.raises(UserError, match="vae_decoder.onnx is missing"):
        B.build(work, RTX)
    (work / "onnx" / "unet.onnx.data").unlink()
    with pytest.raises(UserError, match="needs its external data unet.onnx.data"):
        mf.model_files(work, _manifest(work), "denoise_step_cfg")


def test_unknown_backend(tmp_path):
    with pytest.raises(UserError, match="unknown backend 'cuda': use one of tensorrt, tensorrt-rtx"):
        B.build(tmp_path, "cuda")
    with pytest.raises(UserError, match="unknown backend"):
        EC.check_engine(tmp_path, "ort", "vae_decoder")


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_missing_module_names_pip_extra(tmp_path):
    work = make_export(tmp_path / "w")
    with pytest.raises(UserError, match=r"pip install 'sdrt\[tensorrt\]'"):
        B.build(work, "tensorrt")


@needs_rtx
def test_check_engine_without_engine(tmp_path):
    work = make_export(tmp_path / "w")
    with pytest.raises(UserError, match=r"no tensorrt-rtx engine for vae_decoder .*run `sdrt build"):
        EC.check_engine(work, RTX, "vae_decoder")


@needs_rtx
def test_damaged_plan(work):
    (work / "engines" / RTX / "vae_decoder.plan").write_bytes(b"short")
    with pytest.raises(UserError, match="vae_decoder is missing or damaged"):
        EC.check_engine(work, RTX, "vae_decoder")
    assert "vae_decoder" in B.build(work, RTX, progress=False)["built"]


# ---- profiles and small parts --------------------------------------------------------------------

def test_parse_dynamic():
    r = B.parse_dynamic("batch=1:2:4,height=256:512:768,width=256:512:768", 1, 512, 512, 8)
    assert r == {"min": {"batch": 1, "height": 256, "width": 256},
                 "opt": {"batch": 2, "height": 512, "width": 512},
                 "max": {"batch": 4, "height": 768, "width": 768}}
    static = B.parse_dynamic(None, 2, 512, 768, 8)
    assert static["min"] == static["opt"] == static["max"] == {"batch": 2, "height": 512, "width": 768}
    assert B.parse_dynamic("batch=3", 1, 64, 64, 8)["max"]["batch"] == 3


@pytest.mark.parametrize("spec, msg", [
    ("batch=4:2:1", "min <= opt <= max"),
    ("batch=0:1:2", "0 < min"),
    ("height=100:512:768", "height 100 must be a positive multiple of 8"),
    ("width=256:512:770", "width 770 must be a positive multiple of 8"),
    ("steps=1:2:3", "bad --dynamic item"),
    ("batch", "bad --dynamic item"),
    ("batch=1:2", "min:opt:max as integers"),
    ("batch=a:b:c", "min:opt:max as integers"),
    ("batch=1:1:2,batch=1:2:2", "gives batch twice"),
])
def test_invalid_dynamic_spec(spec, msg):
    with pytest.raises(UserError, match=msg):
        B.parse_dynamic(spec, 1, 512, 512, 8)


def test_invalid_static_size_and_options(tmp_path):
    work = make_export(tmp_path / "w")
    with pytest.raises(UserError, match="height 100 must be a positive multiple of 8"):
        B.build(work, RTX, height=100)
    with pytest.raises(UserError, match="batch 0 must be positive"):
        B.build(work, RTX, batch=0)
    with pytest.raises(UserError, match="opt level 9"):
        B.build(work, RTX, opt_level=9)
    with pytest.raises(UserError, match="--max-prompt-chunks 0 must be at least 1"):
        B.build(work, RTX, max_prompt_chunks=0)


def test_profile_from_contract():
    m = contract.denoise_step(CFG, "fp16", guidance=False)
    p = B.profile_for(m, B.parse_dynamic("batch=1:2:3", 1, 64, 128, 8), False, 8, max_chunks=2,
                      text_len=CFG.text_len)
    assert p["latents"] == {"min": [1, 4, 8, 16], "opt": [2, 4, 8, 16], "max": [3, 4, 8, 16]}
    # no guidance: text batch == batch; text length 1 chunk (min, opt) to 2 chunks (max)
    assert p["text_embeddings"] == {"min": [1, 8, 16], "opt": [2, 8, 16], "max": [3, 16, 16]}
    assert p["step_index"] == {"min": [1], "opt": [2], "max": [3]}   # one row index per sample


def test_model_files_from_manifest(tmp_path):
    work = make_export(tmp_path / "w")
    man = _manifest(work)
    assert man["models"]["denoise_step_cfg"]["files"] == ["denoise_step_cfg.onnx", "unet.onnx.data"]
    assert man["models"]["vae_decoder"]["files"] == ["vae_decoder.onnx"]
    assert external_data_locations(work / "onnx" / "text_encoder.onnx") == ["text_encoder.onnx.data"]
    step = mf.model_files(work, man, "denoise_step_cfg")
    assert step == [work / "onnx" / "denoise_step_cfg.onnx", work / "onnx" / "unet.onnx.data"]
    assert mf.files_sha256(step) == man["models"]["denoise_step_cfg"]["sha256"]
    del man["models"]["denoise_step_cfg"]["files"]  # older manifests: the .onnx alone
    assert mf.model_files(work, man, "denoise_step_cfg") == [work / "onnx" / "denoise_step_cfg.onnx"]


def test_onnx_hash_without_external_data_is_file_hash(tmp_path):
    write_vae_decoder(tmp_path)
    p = tmp_path / "vae_decoder.onnx"
    assert mf.files_sha256([p]) == mf.sha256_file(p)


def test_unsupported_op_reports_first_parser_error(tmp_path):
    import onnx
    from onnx import helper, TensorProto
    if not HAS_RTX:
        pytest.skip("tensorrt_rtx not installed")
    work = make_export(tmp_path / "w")
    m = contract.vae_decoder(CFG, "fp16")
    ins, outs = _graph_io(m)
    nodes = [helper.make_node("Cast", ["latents"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("NoSuchOp", ["x"], ["image"], name="mystery", domain="sdrt.test")]
    model = helper.make_model(helper.make_graph(nodes, "v", ins, outs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("sdrt.test", 1)])
    model.ir_version = 8
    onnx.save(model, str(work / "onnx" / "vae_decoder.onnx"))
    with pytest.raises(UserError, match=r"cannot parse .*vae_decoder.onnx at node 1 'mystery' \(NoSuchOp\): "
                                        r".*export again") as e:
        B.build(work, RTX, progress=False)
    assert "\n" not in str(e.value)
    assert sorted(EC.check_engine(work, RTX, n).name for n in ("text_encoder", "denoise_step_cfg")) == \
        ["denoise_step_cfg.plan", "text_encoder.plan"]  # the models before it were kept


@needs_rtx
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_timing_cache_saved_and_reloaded(tmp_path, monkeypatch):
    """The TensorRT timing-cache path, run through RTX's (no-op, deprecated) timing cache API."""
    real = B.builder_api
    monkeypatch.setattr(B, "builder_api", lambda trt, backend: {**real(trt, backend), "timing_cache": True})
    cache = tmp_path / "timing.cache"
    B.build(make_export(tmp_path / "a"), RTX, timing_cache=cache, progress=False)
    assert cache.stat().st_size > 0 and not list(tmp_path.glob(".timing.cache.*"))
    cache.write_bytes(b"damaged")  # unusable cache: start afresh, then save a good one
    B.build(make_export(tmp_path / "b"), RTX, timing_cache=cache, progress=False)
    assert cache.read_bytes() != b"damaged"


@needs_rtx
@pytest.mark.slow
def test_real_tiny_export_builds(tiny_fp16, tmp_path):
    """The exporter's real graphs (tiny random pipeline, FP16) build with RTX and check clean."""
    work = tmp_path / "work"
    shutil.copytree(tiny_fp16, work)
    result = B.build(work, RTX, progress=False)
    assert sorted(result["built"]) == ["denoise_step_cfg", "text_encoder", "vae_decoder", "vae_encoder"]
    for name in result["built"]:
        EC.check_engine(work, RTX, name)
    assert B.build(work, RTX, progress=False)["built"] == []


def _layer_types(trt, path: Path) -> list[str]:
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(0)
    assert trt.OnnxParser(network, logger).parse_from_file(str(path))
    return [str(network.get_layer(i).type).rsplit(".", 1)[-1] for i in range(network.num_layers)]


@needs_rtx
@pytest.mark.parametrize("name", ["denoise_step_cfg", "vae_decoder"])
def test_attention_op_parses_to_fused_attention_layers(tiny_fp16, name):
    """Every ONNX Attention node of the export becomes one IAttention (no MatMul/Softmax chain)."""
    import tensorrt_rtx
    man = mf.load(tiny_fp16)
    expected = man["models"]["unet" if name.startswith("denoise") else name]["attention_ops"]["Attention"]
    types = _layer_types(tensorrt_rtx, tiny_fp16 / "onnx" / f"{name}.onnx")
    assert expected > 0 and types.count("ATTENTION_INPUT") == expected
    assert "SOFTMAX" not in types


class _FakeTrt:
    def __init__(self, version):
        self.__version__ = version


@pytest.mark.parametrize("version, backend, form, refused", [
    ("10.3.0.30", "tensorrt", "op", True),          # JetPack 6
    ("10.13.3", "tensorrt", "op", True),
    ("10.14.1", "tensorrt", "op", False),
    ("11.0.0", "tensorrt", "op", False),
    ("10.3.0.30", "tensorrt", "decomposed", False),
    ("1.7.1.116", "tensorrt-rtx", "op", False),
])
def test_attention_op_needs_tensorrt_10_14(version, backend, form, refused):
    if refused:
        with pytest.raises(UserError, match="--attention decomposed"):
            B.check_attention_support(_FakeTrt(version), backend, form)
    else:
        B.check_attention_support(_FakeTrt(version), backend, form)
