"""Quality per UNet evaluation of each sampler on the demo model (`sdrt eval`'s measures).

    python -m sdrt.benchmarks.sampler_quality run WORK_DIR OUT.json [--n 48]   (resumable)
    python -m sdrt.benchmarks.sampler_quality report OUT.json RESULTS_DIR

For each (sampler, steps[, cfg cut-off]) it generates the same n seen and n held-out captions
(benchmarks/eval.py's pick, guidance 5) as one batch each from one seed, and records the
checker's accuracies and the domain FID (benchmarks/scene_features.py) per split. UNet
evaluations per image: 2 per guided step (the uncond and cond halves), 1 per unguided step.
A few configurations are repeated with other seeds: their spread is the run-to-run noise that a
difference must exceed. Results are appended to OUT.json after each configuration (atomically),
so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from sdrt import scenes
from sdrt.benchmarks import eval as ev
from sdrt.benchmarks import scene_features
from sdrt.fileio import write_atomic, write_json_atomic

GUIDANCE = 5.0
SEEDS = (0, 1000, 2000)
# (sampler, steps, cfg cut-off, seeds): DDIM-50 is the reference
CONFIGS = ([("DDIM", s, None, SEEDS[:1]) for s in (4, 8, 12, 20, 30)]
           + [("DDIM", 50, None, SEEDS)]
           + [(name, s, None, SEEDS[:1]) for name in ("Euler", "Euler a", "DPM++ 2M Karras", "DPM++ 2M SDE Karras")
              for s in (4, 8, 12, 20, 30)]
           + [("DPM++ 2M Karras", 12, None, SEEDS[1:])]
           + [("DDPM", s, None, SEEDS[:1]) for s in (8, 20, 50)]
           + [("LCM", s, None, SEEDS[:1]) for s in (4, 8)]
           + [("DPM++ 2M Karras", s, 0.5, SEEDS[:1]) for s in (12, 20)]
           + [("DDIM", 50, 0.5, SEEDS[:1])])
MEASURES = ("all", "shape", "position", "fid")


def key(sampler, steps, cutoff, seed) -> str:
    return f"{sampler}|{steps}|{cutoff}|{seed}"


def evaluations(steps: int, cutoff) -> int:
    guided = steps if cutoff is None else int(steps * cutoff)
    return 2 * guided + (steps - guided)


def run(work_dir: Path, out: Path, n: int = 48, backend: str = "onnxruntime-cpu") -> dict:
    from sdrt.engine.pipeline import Pipeline
    pipe = Pipeline(work_dir, backend=backend)
    weights = scene_features.load()
    results = json.loads(out.read_text()) if out.is_file() else {"n": n, "guidance": GUIDANCE, "runs": {}}
    lists = {name: ev.pick(held, n, 0) for name, held in (("seen", False), ("held_out", True))}
    todo = [(s, st, c, seed) for s, st, c, seeds in CONFIGS for seed in seeds]
    for i, (sampler, steps, cutoff, seed) in enumerate(todo):
        k = key(sampler, steps, cutoff, seed)
        if k in results["runs"]:
            continue
        t0 = time.perf_counter()
        rec = {"sampler": sampler, "steps": steps, "cfg_cutoff": cutoff, "seed": seed,
               "unet_evaluations": evaluations(steps, cutoff)}
        for split, scene_list in lists.items():
            captions = [s.caption for s in scene_list]
            images = pipe.generate(captions, steps=steps, guidance=GUIDANCE, seed=seed, batch=len(captions),
                                   height=scenes.SIZE, width=scenes.SIZE, sampler=sampler,
                                   cfg_cutoff=cutoff).images
            rec[split] = {**ev.accuracies(images, scene_list), "fid": ev.fid(images, scene_list, weights)}
        rec["seconds"] = time.perf_counter() - t0
        results["runs"][k] = rec
        write_json_atomic(out, results)
        print(f"[{i + 1}/{len(todo)}] {k}: all {rec['seen']['all']:.1f}/{rec['held_out']['all']:.1f}% "
              f"fid {rec['seen']['fid']:.1f}/{rec['held_out']['fid']:.1f} ({rec['seconds']:.0f}s)",
              file=sys.stderr, flush=True)
    return results


def fid_sanity(n: int = 48, sigma: float = 0.6) -> dict:
    """Does the domain FID rank what it should? Rendered (true) images against themselves with
    another draw of captions, and a blurred copy of the same renders."""
    from PIL import Image, ImageFilter
    weights = scene_features.load()
    out = {}
    for split, held in (("seen", False), ("held_out", True)):
        scene_list = ev.pick(held, n, 0)
        real = np.stack([scenes.render(s) for s in scene_list])
        blur = np.stack([np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(sigma))) for a in real])
        other = np.stack([scenes.render(s) for s in ev.pick(held, n, 1)])
        out[split] = {"blurred": ev.fid(blur, scene_list, weights), "other_captions": ev.fid(other, scene_list, weights)}
    return out


def summarize(results: dict) -> dict:
    """Per (sampler, cut-off): points sorted by evaluations; the noise of the repeated configs; the
    fewest evaluations within the noise of DDIM-50 (on the checker's 'all' accuracy, both splits)."""
    runs = list(results["runs"].values())
    mean = lambda r, m: (r["seen"][m] + r["held_out"][m]) / 2

    def spread(sampler, steps, cutoff):
        vals = [mean(r, "all") for r in runs if (r["sampler"], r["steps"], r["cfg_cutoff"]) == (sampler, steps, cutoff)]
        return (min(vals), max(vals)) if len(vals) > 1 else None

    ref_runs = [r for r in runs if (r["sampler"], r["steps"], r["cfg_cutoff"]) == ("DDIM", 50, None)]
    ref = float(np.mean([mean(r, "all") for r in ref_runs]))
    noises = [s[1] - s[0] for s in (spread("DDIM", 50, None), spread("DPM++ 2M Karras", 12, None)) if s]
    noise = max(noises) if noises else 0.0
    series = {}
    for r in runs:
        if r["seed"] != SEEDS[0]:
            continue
        label = r["sampler"] + (f", cfg cut-off {r['cfg_cutoff']}" if r["cfg_cutoff"] is not None else "")
        series.setdefault(label, []).append(r)
    best = {}
    for label, rs in series.items():
        rs.sort(key=lambda r: r["unet_evaluations"])
        hit = next((r for r in rs if mean(r, "all") >= ref - noise), None)
        best[label] = hit["unet_evaluations"] if hit else None
    return {"reference_all": ref, "noise": noise, "series": series, "fewest": best}


def report(out: Path, results_dir: Path, device: str = "2 CPU cores, ONNX Runtime CPU") -> Path:
    from sdrt.benchmarks import plots
    results = json.loads(out.read_text())
    s = summarize(results)
    sanity = results.get("fid_sanity") or fid_sanity(results["n"])
    mean = lambda r, m: (r["seen"][m] + r["held_out"][m]) / 2
    lines = [f"# Quality per UNet evaluation, demo model (measured on {device})", "",
             f"`python -m sdrt.benchmarks.sampler_quality run WORK_DIR OUT.json --n {results['n']}`: the demo "
             f"model exported FP32, {results['n']} seen + {results['n']} held-out captions (sdrt eval's pick), "
             f"guidance {results['guidance']}, one batch per split from one seed. UNet evaluations per image: 2 per "
             "guided step, 1 per step after the CFG cut-off. `all` = the checker reads every attribute right "
             "(colour, background, shape, size, position), mean of the two splits; FID on the domain's features "
             "(not Inception), mean of the two splits.", "",
             f"Domain-FID sanity (rendered images, n={results['n']}): blurred (σ=0.6) vs sharp "
             f"{sanity['seen']['blurred']:.1f} / {sanity['held_out']['blurred']:.1f} (seen / held-out); "
             f"other captions {sanity['seen']['other_captions']:.1f} / {sanity['held_out']['other_captions']:.1f}.", "",
             f"Reference DDIM-50: all {s['reference_all']:.1f}%; run-to-run noise (max - min over seeds "
             f"{', '.join(map(str, SEEDS))} of DDIM-50 and of DPM++ 2M Karras-12): {s['noise']:.1f} points.", "",
             "| sampler | steps | UNet evals | all % | shape % | position % | FID |", "|---|---|---|---|---|---|---|"]
    for label, rs in s["series"].items():
        for r in rs:
            lines.append(f"| {label} | {r['steps']} | {r['unet_evaluations']} | {mean(r, 'all'):.1f} | "
                         f"{mean(r, 'shape'):.1f} | {mean(r, 'position'):.1f} | {mean(r, 'fid'):.1f} |")
    lines += ["", "Repeats (other seeds):", ""]
    for r in results["runs"].values():
        if r["seed"] != SEEDS[0]:
            lines.append(f"- {r['sampler']}-{r['steps']} seed {r['seed']}: all {mean(r, 'all'):.1f}%, "
                         f"FID {mean(r, 'fid'):.1f}")
    lines += ["", "Fewest UNet evaluations per image within the noise of DDIM-50's `all` accuracy "
              "(DDIM-50 = 100):", ""]
    for label, ev_ in s["fewest"].items():
        lines.append(f"- {label}: {ev_ if ev_ is not None else 'not reached'}"
                     + (f" ({100 / ev_:.1f}x fewer than DDIM-50)" if ev_ else ""))
    md = results_dir / "sampler-quality-demo-cpu.md"
    write_atomic(md, ("\n".join(lines) + "\n").encode())
    fig, (a1, a2) = plots.figure(2)
    series_all = [plots.Series(label, [r["unet_evaluations"] for r in rs], [mean(r, "all") for r in rs])
                  for label, rs in s["series"].items()]
    series_fid = [plots.Series(label, [r["unet_evaluations"] for r in rs], [mean(r, "fid") for r in rs])
                  for label, rs in s["series"].items()]
    plots.lines(a1, series_all, "UNet evaluations per image", "checker: all attributes right, %")
    plots.lines(a2, series_fid, "UNet evaluations per image", "domain FID (lower is better)")
    versions = {"sdrt": __import__("sdrt").__version__}
    plots.save(fig, results_dir / "sampler-quality-demo-cpu.png",
               plots.caption(device, versions, f"n={results['n']} per split, guidance {results['guidance']}",
                             f"run-to-run noise of 'all': {s['noise']:.1f} points"))
    return md


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "run":
        n = int(sys.argv[sys.argv.index("--n") + 1]) if "--n" in sys.argv else 48
        out = Path(sys.argv[3])
        res = run(Path(sys.argv[2]), out, n)
        res["fid_sanity"] = fid_sanity(n)
        write_json_atomic(out, res)
    else:
        print(report(Path(sys.argv[2]), Path(sys.argv[3])))
