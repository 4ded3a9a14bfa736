"""One output convention for every command: images in the format their extension names (PNG,
JPEG, WebP; anything else refused in one line before any work), missing folders created, and a
batch written as NAME-0.EXT ... NAME-{B-1}.EXT."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, run_cli


@pytest.mark.parametrize("name, fmt", [("o.png", "PNG"), ("o.JPG", "JPEG"), ("o.jpeg", "JPEG"), ("o.webp", "WEBP")])
def test_generate_writes_the_format_of_the_extension(tiny_fp32, tmp_path, name, fmt):
    out = tmp_path / "new" / "folder" / name                  # missing folders: created
    p = run_cli("generate", tiny_fp32, "a fox", "--steps", 2, "--seed", 0, "--out", out)
    assert p.returncode == 0, p.stderr
    with Image.open(out) as img:
        assert img.format == fmt and img.size == (64, 64)
    assert [f.name for f in out.parent.iterdir()] == [name]   # no temp file left


def test_generate_batch_names(tiny_fp32, tmp_path):
    p = run_cli("generate", tiny_fp32, "a fox", "--steps", 2, "--batch", 2, "--out", tmp_path / "o.jpg")
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == ["o-0.jpg", "o-1.jpg"]
    assert f"wrote {tmp_path / 'o-0.jpg'}" in p.stdout


@pytest.mark.parametrize("name", ["x", "x.gif", "x.npy"])
def test_other_extensions_are_refused_before_any_work(tiny_fp32, tmp_path, name):
    assert_user_error(run_cli("generate", tiny_fp32, "a fox", "--steps", 2, "--out", tmp_path / name),
                      ".png, .jpg, .jpeg or .webp")
    assert list(tmp_path.iterdir()) == []


def test_eval_and_demo_follow_the_rule(tmp_path):
    assert_user_error(run_cli("eval", tmp_path, "--grid", tmp_path / "g.gif"), "--grid", ".webp")
    assert_user_error(run_cli("eval", tmp_path, "--out", tmp_path / "r.txt"), "--out", ".json")
    assert_user_error(run_cli("demo", "--dir", tmp_path, "--out", tmp_path / "g"), "--out", ".png")
    assert list(tmp_path.iterdir()) == []


def test_save_images_is_all_or_nothing(tmp_path):
    from sdrt.errors import UserError
    from sdrt.fileio import save_images
    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError):
        save_images([img, img], [tmp_path / "a.png", tmp_path / "b.bmp"])
    assert list(tmp_path.iterdir()) == []
