"""`sdrt bench` on CPU with the tiny model: structure of the results, never speed. The
interleaving, the spread warning, --compare and the plots are checked on made-up timings."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from sdrt.benchmarks import bench, plots, report

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
    assert [line for line in p.stdout.splitlines() if line.startswith("wrote ")] == [f"wrote {f}" for f in files]
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
        assert r["runs"] == 2 and r["interleaved"] and r["prompt"] == bench.PROMPT   # fits the tiny tokenizer
        for stats in (r["stages"], r["reference_stages"]):
            assert stats["vae_encoder"] is None                                      # text to image
            for stage in ("tokenize", "text_encoder", "denoise", "vae_decoder", "total"):
                assert 0 < stats[stage]["min"] <= stats[stage]["median"] <= stats[stage]["max"], stage
        assert r["e2e_ms"] == r["stages"]["total"]["median"]
    table = files[1].read_text()
    assert f"| onnxruntime-cpu | {tiny_fp32.name}: fp32, attention op |" in table
    assert f"{tiny_fp32_decomposed.name}: fp32, attention decomposed" in table
    assert "device: cpu" in table and "onnxruntime-cpu: step graph: CPU backend: no CUDA graphs" in table
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Where the time goes" in table and "| diffusers eager FP32, CPU | 64x96x3 steps | 1 | 2 |" in table
    # interleaved: per configuration, each run goes round the three contenders
    runs = [line.split(": ")[1] for line in p.stderr.splitlines() if "batch 1:" in line and ": run " in line]
    assert runs == [f"sdrt onnxruntime-cpu ({tiny_fp32.name})", f"sdrt onnxruntime-cpu ({tiny_fp32_decomposed.name})",
                    "diffusers eager FP32, CPU"] * 2


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
    assert_user_error(run_cli("bench", tiny_fp32, "--no-reference", "--backends", "onnx-cpu",
                              "--out", tmp_path / "r"), "--backends 'onnx-cpu'", "onnxruntime-cpu", "available")
    assert_user_error(run_cli("bench", "--compare", tmp_path / "missing.json", "--out", tmp_path / "r"),
                      "--compare needs two or more")
    assert_user_error(run_cli("bench", tiny_fp32, "--compare", tmp_path / "a.json", tmp_path / "b.json",
                              "--out", tmp_path / "r"), "--compare takes result files only")
    assert not (tmp_path / "r").exists()


def test_bench_image_inputs_time_the_encoder(tiny_dir, tiny_fp32, tmp_path):
    """--image / --mask: the size is the image's, the VAE encoder is timed, diffusers' img2img /
    inpainting pipelines are the reference (same noise, posterior mean: same images)."""
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((64, 96), np.uint8)
    mask[8:40, 16:64] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    for extra, mode, run in (([], "img2img", 3), (["--mask", tmp_path / "mask.png", "--strength", "0.5"], "inpaint", 2)):
        out = tmp_path / mode
        p = run_cli("bench", tiny_fp32, "--reference", tiny_dir, "--image", tmp_path / "in.png", *extra,
                    "--steps", "4", "--batches", "2", "--runs", "1", "--warmup", "0", "--out", out)
        assert p.returncode == 0, p.stderr
        [record] = json.loads(sorted(out.iterdir())[0].read_text())["records"]
        assert (record["height"], record["width"], record["mode"], record["steps_run"]) == (64, 96, mode, run)
        assert record["vae_encoder_ms"] > 0 and record["psnr_vs_reference"] >= 50
        assert record["stages"]["vae_encoder"]["min"] > 0 and record["reference_stages"]["vae_encoder"]["min"] > 0
        assert "| VAE encoder |" in sorted(out.iterdir())[1].read_text()
    assert_user_error(run_cli("bench", tiny_fp32, "--reference", tiny_dir, "--image", tmp_path / "in.png",
                              "--sizes", "64x64", "--out", tmp_path / "r"), "--sizes 64x64", "64x96")
    assert not (tmp_path / "r").exists()


def test_bench_lora_says_what_it_wrote_under_the_current_directory(tiny_fp32, tmp_path):
    p = run_cli("bench-lora", tiny_fp32, "--rank", "2", "--size", "64", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    written = sorted((tmp_path / "sdrt-results").iterdir())
    assert [f.suffix for f in written] == [".json", ".md"]
    assert sorted(line.removeprefix("wrote ") for line in p.stdout.splitlines() if line.startswith("wrote ")) == \
        [str(f.relative_to(tmp_path)) for f in written]


def test_results_default_under_the_current_directory():
    from sdrt.cli import parser
    for cmd in (["bench"], ["bench-lora", "w"]):
        assert parser().parse_args(cmd).out == Path("sdrt-results")


# ---- the prompt ------------------------------------------------------------------------------------

class WordTokenizer:
    """One token per word, `model_max_length` with bos and eos."""
    def __init__(self, model_max_length):
        self.model_max_length = model_max_length

    def token_ids(self, text):
        return text.split()


def test_prompt_fits_the_tokenizer():
    assert bench.fit("a photo of an astronaut riding a horse", WordTokenizer(7)) == "a photo of an astronaut"
    assert bench.fit("a photo", WordTokenizer(77)) == "a photo"


def test_demo_model_gets_a_caption_of_its_world(tmp_path):
    """The demo's tokenizer is 16 tokens long: the default prompt would be truncated by diffusers
    (and chunked by sdrt); the benchmark uses a caption the demo was trained on."""
    from sdrt.demo import DEMO_MODEL
    from sdrt.engine.tokenizer import ClipTokenizer
    from sdrt.scenes import WORDS
    work = tmp_path / "demo-export"
    shutil.copytree(DEMO_MODEL / "tokenizer", work / "tokenizer")
    prompt = bench.bench_prompt(work, {"source": {"path": str(tmp_path / "elsewhere")}})
    assert set(prompt.text.replace(",", " ,").split()) <= set(WORDS) and prompt.negative == ""
    tok = ClipTokenizer.from_dir(work / "tokenizer")
    assert len(tok.token_ids(prompt.text)) + 2 <= tok.model_max_length
    assert len(tok.token_ids(bench.PROMPT)) + 2 > tok.model_max_length    # why it matters


# ---- made-up timings: interleaving, spread warning, plots, --compare ------------------------------

class FakeContender:
    is_reference = False

    def __init__(self, name, log, ms):
        self.name, self.log, self.ms = name, log, ms

    def run(self, prompt, steps, h, w, batch, latents, inputs):
        self.log.append((self.name, h, w, batch))
        ms = self.ms.pop(0) if isinstance(self.ms, list) else self.ms
        stages = {"tokenize": 1.0, "text_encoder": 10.0, "vae_encoder": None, "denoise": ms - 31.0,
                  "vae_decoder": 20.0, "total": ms}
        return bench.Sample(np.zeros((batch, h, w, 3), np.uint8), stages, [(ms - 31.0) / steps] * steps)


@pytest.mark.parametrize("interleave", [True, False])
def test_measure_runs_contenders_alternately(interleave):
    log = []
    a, b = FakeContender("A", log, 100.0), FakeContender("B", log, 200.0)
    samples = bench.measure([a, b], [(64, 64, 1), (64, 64, 2)], bench.Prompt("p", "", 7.5), 4, runs=3, warmup=1,
                            interleave=interleave, latents=lambda h, w, b: None, inputs={})
    per_config = [name for name, *_ in log[:8]]
    timed = per_config[2:]                             # after one warm-up each
    assert per_config[:2] == ["A", "B"]
    assert timed == (["A", "B"] * 3 if interleave else ["A"] * 3 + ["B"] * 3)
    assert [x[3] for x in log] == [1] * 8 + [2] * 8    # one configuration after the other
    assert {k: len(v) for k, v in samples.items()} == {(0, (64, 64, 1)): 3, (1, (64, 64, 1)): 3,
                                                       (0, (64, 64, 2)): 3, (1, (64, 64, 2)): 3}
    assert bench.run_order(2, 2, True) == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert bench.run_order(2, 2, False) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def stats(median, lo=None, hi=None):
    return {"min": median if lo is None else lo, "median": median, "max": median if hi is None else hi}


def fake_record(batch=1, total=(100, 98, 104), ref_total=(150, 148, 153), psnr=60.0, export="tiny-op", h=64):
    def stages(t):
        return {"tokenize": stats(1), "text_encoder": stats(10), "vae_encoder": None,
                "denoise": stats(t[0] - 31, t[1] - 31, t[2] - 31), "vae_decoder": stats(20), "total": stats(*t)}
    return {"device": "cpu (x86_64, 2 cores)", "backend": "onnxruntime-cpu", "precision": "fp32", "attention": "op",
            "export": export, "height": h, "width": 64, "steps": 4, "batch": batch, "runs": 3, "mode": "txt2img",
            "strength": None, "steps_run": 4, "prompt": "p", "negative": "", "guidance": 7.5, "interleaved": True,
            "stages": stages(total), "e2e_ms": total[0], "unet_step_ms": (total[0] - 31) / 4,
            "images_per_s": batch / total[0] * 1e3, "peak_mem_mb": 600.0, "reference": "diffusers eager FP32, CPU",
            "reference_stages": stages(ref_total), "reference_e2e_ms": ref_total[0],
            "reference_unet_step_ms": (ref_total[0] - 31) / 4, "speedup_e2e": ref_total[0] / total[0],
            "psnr_vs_reference": psnr, "graph": "none", "graph_error": None,
            "versions": {"sdrt": "0.1.0", "onnxruntime": "1.23.0"}}


def test_table_warns_of_a_noisy_machine_and_flags_low_psnr():
    calm = report.table([fake_record()])
    assert "noisy machine" not in calm and "(< 30" not in calm
    assert "| 100.0 (98.0-104.0) | 150.0 (148.0-153.0) | 1.50x |" in calm
    assert "| 69.0 (67.0-73.0) |" in calm                      # denoise: median (min-max)
    noisy = report.table([fake_record(total=(100, 95, 120), psnr=12.3)])
    [line] = [line for line in noisy.splitlines() if "noisy machine" in line]
    assert "compare within one run" in line and "tiny-op: fp32, attention op), 64x64, batch 1: denoise 36%" in line
    assert "**12.3 (< 30: differ)**" in noisy and "PSNR under 30 dB" in noisy


def captured_figures(monkeypatch) -> list:
    figs = []
    save = plots.save

    def keep(fig, path, caption_text=""):
        figs.append((fig, fig.axes[:], caption_text))
        return save(fig, path, caption_text)
    monkeypatch.setattr(plots, "save", keep)
    return figs


def test_plot_bars_for_one_configuration_lines_over_batch(tmp_path, monkeypatch):
    from PIL import Image
    figs = captured_figures(monkeypatch)
    report.plot([fake_record(psnr=12.0)], tmp_path / "one.png")
    report.plot([fake_record(), fake_record(batch=2, total=(180, 170, 190), ref_total=(290, 280, 300))],
                tmp_path / "two.png")
    (fig1, axes1, caption1), (fig2, axes2, _) = figs
    assert len(axes1) == 1                                          # one configuration: bars only
    ax = axes1[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 153
    assert [t.get_text() for t in ax.texts] == ["1.50x\nPSNR 12 dB!"]   # the speed-up on sdrt's bar
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sdrt ort-cpu\ntiny-op", "diffusers"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["tokenize", "text encoder", "denoise",
                                                                   "VAE decoder"]
    assert "cpu (x86_64, 2 cores)" in caption1 and "onnxruntime 1.23.0" in caption1 and "3 runs" in caption1
    bars, lines = [a for a in axes2 if a.get_xlabel() != "batch"], [a for a in axes2 if a.get_xlabel() == "batch"]
    assert len(bars) == 1 and len(lines) == 1                       # two batches: a line panel too
    assert lines[0].get_xlim()[0] == 0 and lines[0].get_ylim()[0] == 0
    drawn = [line for line in lines[0].get_lines() if not line.get_label().startswith("_")]   # not whisker caps
    assert [line.get_label() for line in drawn] == ["sdrt ort-cpu tiny-op", "diffusers"]
    assert [list(line.get_xdata()) for line in drawn] == [[1, 2], [1, 2]]
    assert list(drawn[0].get_ydata()) == [100, 90]                  # ms per image
    for path, fig in ((tmp_path / "one.png", fig1), (tmp_path / "two.png", fig2)):
        w, h = fig.get_size_inches()
        assert Image.open(path).size == (round(w * plots.DPI), round(h * plots.DPI))


def write_result(path: Path, records: list) -> Path:
    path.write_text(json.dumps({"records": records}))
    return path


def test_compare_matches_configurations_ratio_and_overlap(tmp_path, monkeypatch):
    a = write_result(tmp_path / "before.json", [fake_record(), fake_record(batch=2, total=(180, 170, 190))])
    b = write_result(tmp_path / "after.json", [fake_record(total=(80, 78, 82)),
                                                fake_record(batch=2, total=(176, 168, 186)),
                                                fake_record(batch=4, total=(300, 290, 310))])
    figs = captured_figures(monkeypatch)
    paths = report.compare([a, b], tmp_path / "cmp")
    assert [p.suffix for p in paths] == [".md", ".png"] and all(p.is_file() for p in paths)
    text = paths[0].read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 64x64")]
    assert rows[0].startswith("| 64x64, batch 1, 4 steps | sdrt onnxruntime-cpu (tiny-op: fp32, attention op) |")
    assert "| 100.0 (98.0-104.0) | 80.0 (78.0-82.0) | 0.800 | no |" in rows[0]
    assert "| 0.978 | yes: within the noise |" in rows[2]         # batch 2: the spreads overlap
    assert rows[1].startswith("| 64x64, batch 1, 4 steps | diffusers eager FP32, CPU |")   # the machine's own check
    assert "batch 4, 4 steps: only from file 2 on" in text
    [(fig, [ax], _)] = figs
    assert ax.get_ylim()[0] == 0
    assert [t.get_text() for t in ax.texts] == ["0.80x time", "1.00x time", "0.98x time", "1.00x time"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["before", "after"] * 4


def test_compare_cli_and_its_errors(tmp_path):
    a = write_result(tmp_path / "a.json", [fake_record()])
    b = write_result(tmp_path / "b.json", [fake_record(total=(120, 110, 130), export="tiny-dec")])
    p = run_cli("bench", "--compare", a, b, "--out", tmp_path / "cmp")
    assert p.returncode == 0, p.stderr
    # two different exports, one record each: matched by configuration
    assert "| sdrt onnxruntime-cpu (tiny-op: fp32, attention op) vs sdrt onnxruntime-cpu (tiny-dec: " in p.stdout
    assert "| 1.200 | no |" in p.stdout
    assert sorted(line.split()[1] for line in p.stdout.splitlines() if line.startswith("wrote ")) == \
        sorted(str(f) for f in (tmp_path / "cmp").iterdir())
    other = write_result(tmp_path / "other.json", [fake_record(h=128)])
    assert_user_error(run_cli("bench", "--compare", a, other, "--out", tmp_path / "r"), "share no configuration")
    old = write_result(tmp_path / "old.json", [{k: v for k, v in fake_record().items() if k != "stages"}])
    assert_user_error(run_cli("bench", "--compare", a, old, "--out", tmp_path / "r"), str(old), "run sdrt bench again")
    (tmp_path / "junk.json").write_text("not json")
    assert_user_error(run_cli("bench", "--compare", a, tmp_path / "junk.json", "--out", tmp_path / "r"), "junk.json")
    assert not (tmp_path / "r").exists()
