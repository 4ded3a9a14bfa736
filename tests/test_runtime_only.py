"""The runtime-only install: the commands that need no extra work, and each one that needs an
extra says which in one line (exit 2, no traceback). Torch, diffusers, transformers, onnx, ... are
blocked by an import hook (tests/runtime_only.py), so this runs in the test venv."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_user_error

RUNNER = Path(__file__).with_name("runtime_only.py")


def run_runtime_only(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, "PYTHONPATH": str(RUNNER.parent)})


def test_the_blocker_blocks():
    from runtime_only import Blocked
    with pytest.raises(ModuleNotFoundError):
        Blocked().find_spec("torch.nn")
    assert Blocked().find_spec("onnxruntime") is None and Blocked().find_spec("numpy") is None


def test_runtime_commands_work(tiny_fp32, tmp_path):
    proc = run_runtime_only("generate", tiny_fp32, "a fox", "--steps", 2, "--out", "fox.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "fox.png").is_file()
    proc = run_runtime_only("doctor", tiny_fp32, "--json", "doctor.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert (tmp_path / "doctor.json").is_file()
    proc = run_runtime_only("init", "demo-copy", "--arch", "demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "demo-copy" / "model_index.json").is_file()
    proc = run_runtime_only("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("sdrt "), proc


@pytest.mark.parametrize("args, extra", [
    (("export", "{model}", "w"), "export"),
    (("init", "d"), "export"),
    (("train-demo", "t"), "export"),
    (("demo",), "export"),
    (("memory", "{work}"), "export"),
    (("bench-lora", "{work}", "--out", "b"), "export"),
    (("bench", "{work}", "--reference", "{model}", "--steps", "1", "--runs", "1", "--batches", "1",
      "--out", "b"), "export"),
    (("bench", "{work}", "--no-reference", "--steps", "1", "--runs", "1", "--batches", "1", "--out", "b"),
     "bench"),
    (("build", "{work}", "--backend", "tensorrt-rtx"), "tensorrt-rtx"),
])
def test_commands_that_need_an_extra_name_it(args, extra, tiny_dir, tiny_fp32, tmp_path):
    args = [str(a).format(model=tiny_dir, work=tiny_fp32) for a in args]
    proc = run_runtime_only(*args, cwd=tmp_path)
    assert_user_error(proc, "pip install 'sdrt[", extra)
    assert proc.stderr.count("needs") == 1, proc.stderr          # said once, not twice
    assert list(tmp_path.iterdir()) == []                        # refused before any work


def test_doctor_without_work_dir_names_the_export_extra(tmp_path):
    """No WORK_DIR means the demo export, which needs the export extra: the backends are still
    reported, and the skipped live check says what to install."""
    proc = run_runtime_only("doctor", cwd=tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "sdrt[export]" in proc.stdout + proc.stderr, proc.stdout
    assert "scheduler config" not in proc.stdout + proc.stderr


def test_only_modules_of_an_extra_are_named():
    from sdrt.extras import MODULE_EXTRA, missing
    assert "export" in str(missing(ModuleNotFoundError("No module named 'torch.nn'", name="torch.nn")))
    assert missing(ModuleNotFoundError("No module named 'sdrt.nowhere'", name="sdrt.nowhere")) is None
    assert set(MODULE_EXTRA.values()) <= {"export", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-rtx",
                                          "bench"}
    tomllib = pytest.importorskip("tomllib")    # Python 3.11+
    extras = tomllib.loads((RUNNER.parent.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(MODULE_EXTRA.values()) <= set(extras)
