"""`sdrt doctor`: the report on this machine (CPU), its JSON, its exit status, and the reasons it
gives for a backend that cannot run (with stand-in modules and GPU descriptions)."""
from __future__ import annotations

import json
import types

import numpy as np

from conftest import assert_user_error, run_cli
from sdrt import doctor as D

H100 = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_total_mb": 81000}
RTX4090 = {"index": 0, "name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "memory_total_mb": 24000}


def cuda_env(gpus=(), cuda_python="12.9.0", driver="12.8", error=None) -> dict:
    return {"cuda_python": cuda_python, "driver_cuda": driver, "runtime_cuda": "12.9", "gpus": list(gpus),
            "error": error}


def fake_ort(providers):
    return types.SimpleNamespace(__version__="1.25.0", get_available_providers=lambda: list(providers))


def status(monkeypatch, name, env, module=types.SimpleNamespace(__version__="1.7.1")):
    monkeypatch.setattr(D, "import_or_none", lambda m: module)
    return D.backend_status(name, env)


def test_doctor_on_cpu_writes_json_and_exits_0(tiny_fp32, tmp_path):
    out = tmp_path / "doctor.json"
    proc = run_cli("doctor", tiny_fp32, "--json", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert set(r) >= {"environment", "gpu_problem", "backends", "work_dir", "live", "ok"} and r["ok"] is True
    env = r["environment"]
    assert env["python"] and env["numpy"] == np.__version__
    assert set(env["cuda"]) == {"cuda_python", "driver_cuda", "runtime_cuda", "gpus", "error"}
    assert [b["backend"] for b in r["backends"]] == list(D.BACKENDS)
    for b in r["backends"]:
        assert set(b) == {"backend", "module", "extra", "installed", "version", "usable", "why"}
        assert b["usable"] == (b["why"] is None)
    assert r["work_dir"]["precision"] == "fp32" and set(r["work_dir"]["models"].values()) == {"fp32"}
    live = {row["backend"]: row for row in r["live"]}
    cpu = live["onnxruntime-cpu"]
    assert cpu["ran"] and cpu["ok"] and cpu["psnr_db"] == "reference"    # not a comparison with itself
    assert cpu["graph"] == "none" and "CPU" in cpu["graph_error"]
    assert cpu["step_ms"] > 0 and cpu["total_ms"] > cpu["step_ms"] and cpu["memory_mb"] > 0
    for name in ("onnxruntime-cuda", "tensorrt", "tensorrt-rtx"):   # no GPU here: each says why
        assert not live[name]["ran"] and live[name]["skipped"]
    assert "reference" in proc.stdout and "result: ok (exit 0)" in proc.stdout
    assert f"wrote {out}" in proc.stdout


def test_doctor_bad_input_is_one_line(tmp_path):
    assert_user_error(run_cli("doctor", tmp_path / "nowhere"), "not a folder")
    assert_user_error(run_cli("doctor", tmp_path, "--json", tmp_path / "no" / "x.json"), "does not exist")


def test_exit_1_when_a_backend_disagrees(monkeypatch, tiny_fp32, capsys):
    """A GPU backend whose image differs from the CPU reference fails the check."""
    usable = {"usable": True, "why": None, "installed": True, "version": "1.25.0"}
    monkeypatch.setattr(D, "backend_status", lambda name, env: {
        "backend": name, "module": D.MODULE[name], "extra": "", "installed": False, "version": None,
        "usable": False, "why": "not here", **(usable if name in ("onnxruntime-cpu", "onnxruntime-cuda") else {})})
    image = np.zeros((1, 64, 64, 3), np.uint8)

    def run_once(work_dir, backend, latents, ort_fusion):
        img = image if backend == "onnxruntime-cpu" else image + 8      # PSNR 30 dB
        return {"image": img, "backend_name": backend, "graph": "none",
                "graph_error": "CUDA graph capture failed: operation not permitted when stream is capturing",
                "step_ms": 1.0, "total_ms": 10.0, "memory_mb": 1.0}
    monkeypatch.setattr(D, "run_once", run_once)
    assert D.doctor(tiny_fp32) == 1
    out = capsys.readouterr().out
    assert "FAILED (needs >= 50 dB)" in out and "operation not permitted when stream is capturing" in out
    assert "result: FAILED (exit 1)" in out


def test_no_live_check_without_work_dir_or_export_extra(monkeypatch, capsys):
    import sdrt.demo
    monkeypatch.setattr(sdrt.demo, "demo_export", lambda: (_ for _ in ()).throw(ImportError("No module named 'torch'")))
    assert D.doctor(None) == 1      # nothing was checked: not "all agree"
    assert "live check skipped" in capsys.readouterr().out


# ---- why a backend is unusable -------------------------------------------------------------------

def test_not_installed_names_the_extra(monkeypatch):
    st = status(monkeypatch, "tensorrt", cuda_env([RTX4090]), module=None)
    assert not st["installed"] and not st["usable"] and "pip install 'sdrt[tensorrt]'" in st["why"]


def test_onnxruntime_without_cuda_ep(monkeypatch):
    st = status(monkeypatch, "onnxruntime-cuda", cuda_env([RTX4090]), fake_ort(["CPUExecutionProvider"]))
    assert st["installed"] and not st["usable"] and "onnxruntime without CUDA EP" in st["why"]
    st = status(monkeypatch, "onnxruntime-cuda", cuda_env([RTX4090]),
                fake_ort(["CUDAExecutionProvider", "CPUExecutionProvider"]))
    assert st["usable"] and st["version"] == "1.25.0"


def test_tensorrt_rtx_not_on_hopper(monkeypatch):
    st = status(monkeypatch, "tensorrt-rtx", cuda_env([H100]))
    assert st["why"] == "TensorRT-RTX engines do not run on compute capability 9.0 (NVIDIA H100 80GB HBM3)"
    assert status(monkeypatch, "tensorrt", cuda_env([H100]))["usable"]        # TensorRT does
    assert status(monkeypatch, "tensorrt-rtx", cuda_env([RTX4090]))["usable"]


def test_cuda_python_13_needs_driver_580(monkeypatch):
    env = cuda_env(cuda_python="13.0.1", driver="12.8", error="CUDA error 35: CUDA driver version is insufficient")
    st = status(monkeypatch, "tensorrt", env)
    assert "cuda-python 13 needs driver >= 580" in st["why"] and "CUDA 12.8" in st["why"]


def test_no_gpu_or_driver(monkeypatch):
    env = cuda_env(driver=None, error="CUDA error 35: CUDA driver version is insufficient for CUDA runtime version")
    assert status(monkeypatch, "tensorrt-rtx", env)["why"].startswith("no NVIDIA GPU / driver")
    assert "no cuda-python" in status(monkeypatch, "tensorrt", cuda_env(cuda_python=None))["why"]


def test_attention_form_against_tensorrt_version(monkeypatch):
    statuses = {"tensorrt": {"installed": True}, "onnxruntime-cuda": {"usable": True, "version": "1.23.2"}}
    monkeypatch.setattr(D, "import_or_none", lambda m: types.SimpleNamespace(__version__="10.3.0.30"))
    problems = D.attention_check({"attention": "op"}, statuses)
    assert any("10.14" in p and "--attention decomposed" in p for p in problems)
    assert any("onnxruntime 1.23.2" in p for p in problems)
    assert D.attention_check({"attention": "decomposed"}, statuses) == []


def test_stale_engine_names_the_field(monkeypatch, tmp_path):
    from sdrt.errors import UserError
    import sdrt.engine.engine_keys
    def check_engine(work_dir, backend, model):
        raise UserError(f"engine {model} is stale: gpu_name changed (built for NVIDIA L4, now NVIDIA H100)")
    monkeypatch.setattr(sdrt.engine.engine_keys, "check_engine", check_engine)
    man = {"engines": {"tensorrt": {"vae_decoder": {}}, "tensorrt-rtx": {"vae_decoder": {}}}}
    rows = D.engine_checks(tmp_path, man, {"tensorrt": {"installed": True}, "tensorrt-rtx": {"installed": False}})
    assert rows[0]["state"] == "stale" and "gpu_name changed" in rows[0]["why"]
    assert rows[1]["state"] == "unchecked"


def test_demo_export_gets_the_engines_it_lacks(monkeypatch, tiny_fp32):
    """For the default demo export, doctor builds engines for usable TensorRT backends; a build
    failure becomes the live check's reason."""
    from sdrt.errors import UserError
    import sdrt.export.build
    built = []

    def build(work_dir, backend):
        built.append(backend)
        if backend == "tensorrt":
            raise UserError("building vae_decoder failed (out of memory)")
    monkeypatch.setattr(sdrt.export.build, "build", build)
    statuses = {n: {"usable": n != "onnxruntime-cuda"} for n in D.BACKENDS}
    D.build_missing_engines(tiny_fp32, {"engines": {}}, statuses)
    assert built == ["tensorrt", "tensorrt-rtx"]
    assert statuses["tensorrt"]["build_error"] == "building vae_decoder failed (out of memory)"
    built.clear()
    D.build_missing_engines(tiny_fp32, {"engines": {"tensorrt": {"x": {}}, "tensorrt-rtx": {"x": {}}}}, statuses)
    assert built == []
