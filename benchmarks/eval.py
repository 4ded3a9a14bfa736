"""`sdrt eval WORK_DIR`: does an export of the demo model draw what its captions say?

Generates n images for seen captions and n for held-out ones (sdrt.scenes.HELD_OUT), with fixed
seeds, on one backend; reads each back with benchmarks/checker.py and reports, per split, the
accuracy of colour, background, shape, size and position, and the FID on this domain's features
(benchmarks/scene_features.py: not Inception-FID) between the generated images and the dataset's
images of the same captions. torch-free: numpy and the chosen backend.

With --upscaler (the ×4 upscaler: an sdrt export, or its diffusers folder run on diffusers), every
generated image is also upscaled to 128x128 and read by the checker again ("upscaled" rows), and
the upscaler's super-resolution is measured against bicubic (benchmarks/upscale_eval.py).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from sdrt import scenes
from sdrt.benchmarks import checker, scene_features, upscale_eval
from sdrt.errors import UserError
from sdrt.fileio import write_json_atomic


def pick(held_out: bool, n: int, seed: int) -> list[scenes.Scene]:
    """n scenes of a split, the same for every run with this seed."""
    pool = scenes.split(held_out)
    idx = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[i] for i in sorted(idx)]


def generate_all(pipe, scene_list, steps: int, guidance: float, seed: int, **sampling) -> np.ndarray:
    """One image per scene, image i from seed + i; uint8 [N, H, W, 3]. sampling: sampler=,
    schedule=, cfg_cutoff= of Pipeline.generate."""
    out, t0 = [], time.perf_counter()
    for i, s in enumerate(scene_list):
        out.append(pipe.generate(s.caption, steps=steps, guidance=guidance, seed=seed + i,
                                 height=scenes.SIZE, width=scenes.SIZE, **sampling).images[0])
        print(f"\r[eval] {i + 1}/{len(scene_list)} images, {time.perf_counter() - t0:.0f}s", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return np.stack(out)


def accuracies(images: np.ndarray, scene_list) -> dict[str, float]:
    hits = [checker.correct(checker.read(img), s) for img, s in zip(images, scene_list)]
    acc = {f: 100.0 * float(np.mean([h[f] for h in hits])) for f in checker.FIELDS}
    acc["all"] = 100.0 * float(np.mean([all(h.values()) for h in hits]))
    return acc


def fid(images: np.ndarray, scene_list, weights) -> float:
    real = np.stack([scenes.render(s) for s in scene_list])
    return scene_features.frechet_distance(scene_features.features(images, weights),
                                           scene_features.features(real, weights))


def save_grid(path: Path, images: dict, scene_lists: dict, per_split: int = 8) -> None:
    """The first images of each split with their captions (held-out ones marked), as `sdrt demo` shows them."""
    from sdrt.demo import grid
    from sdrt.fileio import save_images
    tiles, captions = [], []
    for split in images:
        for img, s in list(zip(images[split], scene_lists[split]))[:per_split]:
            tiles.append(img)
            captions.append(s.caption + (" [held out]" if s.held_out else ""))
    save_images([grid(tiles, captions)], [path])


def open_upscaler_for(path: Path | None, backend: str, steps: int | None, noise_level: int | None):
    """The ×4 upscaler to run after text to image (None without --upscaler), with the demo's settings."""
    from sdrt import demo
    if path is None:
        if steps is not None or noise_level is not None:
            raise UserError("--upscaler-steps and --noise-level need --upscaler (the ×4 upscaler's export or folder)")
        return None
    steps = demo.UPSCALE_STEPS if steps is None else steps
    noise_level = demo.NOISE_LEVEL if noise_level is None else noise_level
    if steps < 1:
        raise UserError(f"--upscaler-steps {steps}: give at least 1")
    if not 0 <= noise_level <= demo.MAX_NOISE_LEVEL:
        raise UserError(f"--noise-level {noise_level}: give 0..{demo.MAX_NOISE_LEVEL} (the demo upscaler's max_noise_level)")
    return upscale_eval.open_upscaler(path, backend, steps, demo.UPSCALE_GUIDANCE, noise_level)


def evaluate(work_dir: Path, backend: str = "auto", n: int = 200, steps: int = 25,
             guidance: float = 5.0, seed: int = 0, grid_path: Path | None = None, sampler: str = "DDIM",
             schedule: str | None = None, cfg_cutoff: float | None = None, upscaler: Path | None = None,
             upscaler_steps: int | None = None, noise_level: int | None = None) -> dict:
    from sdrt.engine.pipeline import Pipeline
    from sdrt.engine.request import resolve_seed
    seed = resolve_seed(seed)                 # -1: a random one, recorded in the report
    from sdrt.engine.request import GenerateRequest
    sampling = dict(sampler=sampler, schedule=schedule, cfg_cutoff=cfg_cutoff)
    GenerateRequest("x", **sampling)         # bad sampler options fail before any model loads
    if n < 2:
        raise UserError(f"--n must be at least 2 (FID needs a covariance), got {n}")
    up = open_upscaler_for(upscaler, backend, upscaler_steps, noise_level)
    pipe = Pipeline(work_dir, backend=backend)
    if pipe.tokenizer.backend.token_to_id("triangle</w>") is None:
        raise UserError(f"{work_dir} is not an export of the demo model (its tokenizer has no 'triangle'): "
                        "sdrt eval measures the demo domain only")
    weights = scene_features.load()
    report = {"work_dir": str(work_dir), "backend": pipe.backend_name, "n": n, "steps": steps,
              "guidance": guidance, "seed": seed, "precision": pipe.manifest.get("precision"), **sampling}
    if up:
        report["upscaler"] = {"path": str(upscaler), "runs_on": up.name, "steps": up.steps,
                              "guidance": up.guidance, "noise_level": up.noise_level}
    images, scene_lists = {}, {}
    for name, held_out in (("seen", False), ("held_out", True)):
        scene_lists[name] = pick(held_out, n, seed)
        print(f"[eval] {name}: {len(scene_lists[name])} captions", file=sys.stderr)
        images[name] = generate_all(pipe, scene_lists[name], steps, guidance, seed, **sampling)
        report[name] = {**accuracies(images[name], scene_lists[name]),
                        "fid": fid(images[name], scene_lists[name], weights), "n": len(scene_lists[name])}
        if up:
            images[name] = upscale_eval.upscale_all(up, images[name], [s.caption for s in scene_lists[name]],
                                                    seed, f"{name} images")
            report[name]["upscaled"] = accuracies(images[name], scene_lists[name])
    if up:
        report["super_resolution"] = upscale_eval.super_resolution(
            up, scene_lists["seen"] + scene_lists["held_out"], seed)
    if grid_path:
        save_grid(grid_path, images, scene_lists)
    return report


def table(report: dict) -> str:
    cols = (*checker.FIELDS, "all", "fid")
    cut = f", cfg cut-off {report['cfg_cutoff']}" if report.get("cfg_cutoff") is not None else ""
    lines = [f"backend {report['backend']}, precision {report['precision']}, {report.get('sampler', 'DDIM')} "
             f"{report['steps']} steps, guidance {report['guidance']}{cut}",
             f"{'split':<10}{'n':>5}" + "".join(f"{c:>12}" for c in cols)]
    for split in ("seen", "held_out"):
        r = report[split]
        lines.append(f"{split:<10}{r['n']:>5}" + "".join(
            f"{r[c]:>12.2f}" if c == "fid" else f"{r[c]:>11.1f}%" for c in cols))
    if "upscaler" in report:
        u = report["upscaler"]
        lines.append(f"upscaled x4 to 128x128 ({u['runs_on']}, {u['steps']} steps, guidance {u['guidance']}, "
                     f"noise level {u['noise_level']}):")
        for split in ("seen", "held_out"):
            r = report[split]["upscaled"]
            lines.append(f"{split:<10}{report[split]['n']:>5}" + "".join(
                f"{'':>12}" if c == "fid" else f"{r[c]:>11.1f}%" for c in cols))
        sr = report["super_resolution"]
        lines.append(f"super-resolution, {sr['n']} renders 128 -> 32 -> 128: upscaler PSNR "
                     f"{sr['upscaler']['psnr_db']:.2f} dB SSIM {sr['upscaler']['ssim']:.4f}; bicubic PSNR "
                     f"{sr['bicubic']['psnr_db']:.2f} dB SSIM {sr['bicubic']['ssim']:.4f}")
    return "\n".join(lines)


def main(work_dir: Path, backend: str = "auto", n: int = 200, steps: int = 25, guidance: float = 5.0,
         seed: int = 0, out: Path | None = None, grid_path: Path | None = None, upscaler: Path | None = None,
         upscaler_steps: int | None = None, noise_level: int | None = None, **sampling) -> dict:
    """Evaluate, print the table, write the JSON report and the grid if asked."""
    from sdrt.fileio import image_format
    if out is not None and Path(out).suffix.lower() != ".json":
        raise UserError(f"--out {out}: give a .json path (the report is written as JSON)")
    if grid_path is not None:
        image_format(grid_path, "--grid")
    upscaling = dict(upscaler=upscaler, upscaler_steps=upscaler_steps, noise_level=noise_level)
    report = evaluate(work_dir, backend, n, steps, guidance, seed, grid_path, **sampling, **upscaling)
    print(table(report))
    print(f"seed {report['seed']}")
    if out:
        write_json_atomic(out, report)
        print(f"wrote {out}")
    if grid_path:
        print(f"wrote {grid_path}")
    return report
