"""benchmarks/plots.py: the figures' structure (axes from zero, whiskers, notes, legend, caption,
PNG size), checked on the matplotlib objects, with made-up numbers."""
from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from PIL import Image  # noqa: E402

from sdrt.benchmarks.plots import DPI, Bar, Series, caption, figure, lines, save, stacked_bars  # noqa: E402

GROUPS = [("64x64, batch 1", [Bar("sdrt", {"tokenize": 1, "text encoder": 20, "denoise": 300, "VAE decoder": 80},
                                  low=380, high=420, note="1.31x"),
                              Bar("diffusers", {"tokenize": 2, "text encoder": 30, "denoise": 400,
                                                "VAE decoder": 100}, low=500, high=560)]),
          ("64x64, batch 2", [Bar("sdrt", {"denoise": 500, "VAE decoder": 150}, low=640, high=700, note="1.2x")])]


def test_stacked_bars_from_zero_with_whiskers_and_notes(tmp_path):
    fig, (ax,) = figure(1, width=7, height=4)
    stacked_bars(ax, GROUPS, "ms")
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 560          # the highest whisker fits
    heights = sorted(round(p.get_height()) for p in ax.patches)
    assert heights == sorted([1, 20, 300, 80, 2, 30, 400, 100, 500, 150])  # one rectangle per segment
    assert [t.get_text() for t in ax.texts] == ["1.31x", "1.2x"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["tokenize", "text encoder", "denoise",
                                                                    "VAE decoder"]
    # one whisker per bar, spanning min..max of the runs
    spans = sorted(tuple(round(v) for v in seg[:, 1]) for c in ax.collections for seg in c.get_segments())
    assert spans == [(380, 420), (500, 560), (640, 700)]
    path = save(fig, tmp_path / "bars.png", caption("cpu (x86_64, 2 cores)", {"sdrt": "0.1.0"}, "3 runs"))
    assert Image.open(path).size == (7 * DPI, 4 * DPI)


def test_lines_from_zero_with_whiskers(tmp_path):
    fig, (a, b) = figure(2)
    lines(a, [Series("sdrt", [1, 2, 4], [400, 350, 330], low=[380, 340, 320], high=[420, 360, 345]),
              Series("diffusers", [1, 2, 4], [530, 410, 400])], "batch", "ms per image")
    lines(b, [Series("ddim", [10, 20, 50], [21.5, 27.0, 31.2])], "UNet evaluations", "PSNR dB")
    for ax in (a, b):
        assert ax.get_xlim()[0] == 0 and ax.get_ylim()[0] == 0
    assert a.get_ylim()[1] >= 530 and a.get_xlim()[1] >= 4
    assert [t.get_text() for t in a.get_legend().get_texts()] == ["sdrt", "diffusers"]
    assert len(a.collections) == 1                        # whiskers only where low/high are given
    path = save(fig, tmp_path / "sub" / "lines.png")      # folders made; no caption is fine
    assert Image.open(path).size == (12 * DPI, round(4.2 * DPI))
    assert not list((tmp_path / "sub").glob(".*"))        # nothing half-written left beside it


def test_caption_names_device_and_versions():
    text = caption("NVIDIA H100", {"sdrt": "0.1.0", "tensorrt": "10.14"}, "5 runs each", "batch 1")
    assert text == "measured on NVIDIA H100; sdrt 0.1.0, tensorrt 10.14. 5 runs each. batch 1"
