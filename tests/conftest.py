"""Shared fixtures: one tiny random-weight pipeline and its FP32/FP16 exports per test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from sdrt.export.init_models import init
    return init(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@pytest.fixture(scope="session")
def tiny_fp32(tiny_dir, tmp_path_factory) -> Path:
    from sdrt.export.export import export
    return export(tiny_dir, tmp_path_factory.mktemp("work") / "tiny-fp32", precision="fp32")


@pytest.fixture(scope="session")
def tiny_fp32_decomposed(tiny_dir, tmp_path_factory) -> Path:
    """FP32 with attention as torch decomposes it (MatMul/Softmax/MatMul), opset 18."""
    from sdrt.export.export import export
    return export(tiny_dir, tmp_path_factory.mktemp("work") / "tiny-fp32-dec", precision="fp32",
                  attention_form="decomposed")


@pytest.fixture(scope="session")
def tiny_fp16(tiny_dir, tmp_path_factory) -> Path:
    """FP16, with the ONNX Runtime attention-fused variant (onnx/ort/) as well."""
    from sdrt.export.export import export
    return export(tiny_dir, tmp_path_factory.mktemp("work") / "tiny-fp16", precision="fp16", ort_fusion=True)


def run_cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run `sdrt ...` in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, "-m", "sdrt.cli", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=900)


def assert_user_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """A user mistake: exit 2, one line on stderr naming the problem, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w.lower() in err.lower(), (w, err)


@pytest.fixture(scope="session")
def tiny_inpaint_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusionInpaintPipeline folder: 9-channel UNet."""
    from sdrt.export.init_models import init
    return init(tmp_path_factory.mktemp("models") / "tiny-inpaint", "tiny-inpaint")


@pytest.fixture(scope="session")
def tiny_inpaint_fp32(tiny_inpaint_dir, tmp_path_factory) -> Path:
    from sdrt.export.export import export
    return export(tiny_inpaint_dir, tmp_path_factory.mktemp("work") / "tiny-inpaint-fp32", precision="fp32")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A folder holding sdrt-demo/: `sdrt demo`, `sdrt bench`, `sdrt serve` run there reuse its export."""
    from sdrt.demo import demo_export
    root = tmp_path_factory.mktemp("demo")
    demo_export(root / "sdrt-demo")
    return root


@pytest.fixture(scope="session")
def demo_fp32(demo_root) -> Path:
    """The trained demo model's FP32 export."""
    from sdrt.demo import EXPORT_NAME
    return demo_root / "sdrt-demo" / EXPORT_NAME
