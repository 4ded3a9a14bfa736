"""`sdrt bench` on CPU with the tiny model: structure of the results, never speed."""
from __future__ import annotations

import json
import shutil

from conftest import assert_user_error, run_cli

REQUIRED = {"device", "backend", "height", "width", "steps", "batch", "e2e_ms", "reference_e2e_ms",
            "unet_step_ms", "reference_unet_step_ms", "text_encoder_ms", "vae_ms", "peak_mem_mb",
            "images_per_s", "psnr_vs_reference", "versions", "graph", "graph_error"}


def test_bench_cpu_tiny(tiny_dir, tiny_fp32, tiny_fp32_decomposed, tmp_path):
    """Two exports of one model (attention op / decomposed) against one reference, one run."""
    out = tmp_path / "results"
    p = run_cli("bench", tiny_fp32, tiny_fp32_decomposed, "--reference", tiny_dir, "--sizes", "64x96", "--steps", "3",
                "--batches", "1,2", "--runs", "2", "--warmup", "1", "--out", out)
    assert p.returncode == 0, p.stderr
    files = sorted(out.iterdir())
    assert [f.suffix for f in files] == [".json", ".md", ".png"]
    records = json.loads(files[0].read_text())["records"]
    assert [(r["backend"], r["attention"], r["batch"]) for r in records] == [
        ("onnxruntime-cpu", "op", 1), ("onnxruntime-cpu", "op", 2),
        ("onnxruntime-cpu", "decomposed", 1), ("onnxruntime-cpu", "decomposed", 2)]
    assert len({r["reference_e2e_ms"] for r in records if r["batch"] == 1}) == 1   # one reference
    for r in records:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert (r["height"], r["width"], r["steps"]) == (64, 96, 3)
        assert r["e2e_ms"] > 0 and r["reference_e2e_ms"] > 0 and r["images_per_s"] > 0
        assert r["psnr_vs_reference"] >= 50          # same weights, same latents: same images
        assert r["device"].startswith("cpu") and "onnxruntime" in r["versions"]
        assert (r["graph"], r["graph_error"]) == ("none", "CPU backend: no CUDA graphs")
    table = files[1].read_text()
    assert f"| onnxruntime-cpu | {tiny_fp32.name}: fp32, attention op |" in table
    assert f"{tiny_fp32_decomposed.name}: fp32, attention decomposed" in table
    assert "device: cpu" in table and "onnxruntime-cpu: step graph: CPU backend: no CUDA graphs" in table
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[reference" in p.stderr and "run 2/2" in p.stderr      # progress shown


def test_bench_bad_input(tiny_fp32, tmp_path):
    assert_user_error(run_cli("bench", tiny_fp32, "--reference", tmp_path, "--no-reference",
                              "--sizes", "64by64", "--out", tmp_path / "r"), "--sizes")
    assert_user_error(run_cli("bench", tiny_fp32, "--reference", tmp_path, "--batches", "1,x",
                              "--out", tmp_path / "r"), "--batches")
    assert_user_error(run_cli("bench", tiny_fp32, "--reference", tmp_path, "--sizes", "64x64",
                              "--out", tmp_path / "r"), "model_index.json")
    other = tmp_path / "other"
    shutil.copytree(tiny_fp32, other)
    man = json.loads((other / "manifest.json").read_text())
    man["source"]["sha256"]["unet"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(man))
    assert_user_error(run_cli("bench", tiny_fp32, other, "--reference", tmp_path, "--no-reference",
                              "--out", tmp_path / "r"), "another model")
    assert not (tmp_path / "r").exists()
