"""VAE decode in slices of the batch: the same image bit for bit as decoding the whole batch, each
slice size bound once per plan, and the automatic slice size from a memory budget."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from sdrt.engine import buffers, vae_slices
from sdrt.engine.pipeline import Pipeline
from sdrt.errors import UserError


@pytest.fixture(scope="module")
def pipe(tiny_fp32):
    return Pipeline(tiny_fp32, backend="onnxruntime-cpu")


def test_sliced_decode_is_bit_identical(pipe):
    lat = np.random.default_rng(3).standard_normal((3, 4, 8, 8), dtype=np.float32)
    run = lambda vb: pipe.generate("a fox", steps=3, height=64, width=64, batch=3, latents=lat, vae_batch=vb)
    whole = run(None)
    assert whole.timings["vae_batch"] == 3
    for vb in (1, 2):
        sliced = run(vb)
        assert sliced.timings["vae_batch"] == vb
        np.testing.assert_array_equal(sliced.images, whole.images)
    assert run(7).timings["vae_batch"] == 3      # more than the batch: the whole batch


def test_each_slice_size_is_bound_once(pipe):
    lat = np.random.default_rng(4).standard_normal((3, 4, 8, 8), dtype=np.float32)
    pipe.generate("a fox", steps=2, height=64, width=64, batch=3, latents=lat, vae_batch=2)
    plan = next(p for (d, *_), p in pipe.plans.items() if d.batch == 3 and d.height == 64)  # keyed (dims, variant, controlnets)
    first = plan.vae[2]
    assert [b.shapes["latents"][0] for b in first] == [2, 1]     # slices of 2 and 1 images
    pipe.generate("a fox", steps=2, height=64, width=64, batch=3, latents=lat, vae_batch=2)
    assert plan.vae[2] is first and all(a is b for a, b in zip(plan.vae[2], first))


def test_bad_vae_batch(pipe, tiny_fp32):
    with pytest.raises(UserError, match="vae batch must be a positive integer"):
        pipe.generate("a fox", steps=2, height=64, width=64, vae_batch=0)
    assert_user_error(run_cli("generate", tiny_fp32, "x", "--vae-batch", "-1", "--steps", "1"), "--vae-batch")


def test_rows_address_the_slice():
    buf = buffers.HostBuffer((3, 2, 2), "float32")
    rows = buffers.Rows(buf, 1, 2)
    assert rows.shape == (2, 2, 2) and rows.ptr == buf.ptr + 4 * 4
    with pytest.raises(ValueError):
        buffers.Rows(buf, 2, 2)


@pytest.mark.parametrize("batch, per_image, budget, want", [
    (8, 100, 1000, 8),      # fits: the whole batch
    (8, 300, 1000, 3),      # as many as fit
    (8, 3000, 1000, 1),     # not even one fits: one at a time
    (1, 3000, 1000, 1),
])
def test_slice_size(batch, per_image, budget, want):
    assert vae_slices.slice_size(batch, per_image, budget) == want


def test_slices_cover_the_batch():
    assert vae_slices.slices(5, 2) == [(0, 2), (2, 2), (4, 1)]
    assert vae_slices.slices(4, 4) == [(0, 4)]


def test_estimate_per_image():
    # 448 MiB at 512x512 FP16 (the sd15 decoder's figure from `sdrt memory`), twice that in FP32
    assert vae_slices.vae_bytes_per_image(512, 512, "fp16") == 448 * 2 ** 20
    assert vae_slices.vae_bytes_per_image(512, 512, "fp32") == 2 * 448 * 2 ** 20


def test_auto_slices_on_a_small_gpu(pipe, monkeypatch):
    """ONNX Runtime on a GPU with 1 GiB free: 512x512 FP16 decodes one image at a time."""
    from sdrt.contract import Dims
    from sdrt.engine import cuda
    monkeypatch.setattr(pipe.backend, "device", "cuda", raising=False)
    monkeypatch.setattr(pipe, "manifest", {**pipe.manifest, "precision": "fp16"})
    monkeypatch.setattr(cuda, "mem_free_bytes", lambda: 1 << 30)
    assert pipe.auto_vae_batch(Dims(4, 512, 512)) == 1
    monkeypatch.setattr(cuda, "mem_free_bytes", lambda: 80 << 30)
    assert pipe.auto_vae_batch(Dims(4, 512, 512)) == 4
