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
           + [("DPM++ 2M", s, None, SEEDS[:1]) for s in (4, 8, 12, 20)]
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
    results["n"] = n
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


ATTRIBUTES = ("colour", "background", "shape", "size")   # what the demo model has learned (not position)


def mean(r: dict, m: str) -> float:
    """A measure averaged over the two splits; "attributes": the mean accuracy of ATTRIBUTES."""
    if m == "attributes":
        return float(np.mean([mean(r, a) for a in ATTRIBUTES]))
    return (r["seen"][m] + r["held_out"][m]) / 2


def summarize(results: dict, measure: str = "attributes") -> dict:
    """Per (sampler, cut-off): points sorted by evaluations; the run-to-run noise (max - min over
    seeds of the repeated configurations, the larger of the two); the fewest evaluations whose
    `measure` is within that noise of DDIM-50's mean over its seeds."""
    runs = list(results["runs"].values())
    same = lambda r, cfg: (r["sampler"], r["steps"], r["cfg_cutoff"]) == cfg
    repeated = [("DDIM", 50, None), ("DPM++ 2M Karras", 12, None)]
    noise = {m: max(max(v) - min(v) for v in ([mean(r, m) for r in runs if same(r, c)] for c in repeated) if v)
             for m in ("attributes", "all", "shape", "position", "fid")}
    ref = {m: float(np.mean([mean(r, m) for r in runs if same(r, repeated[0])])) for m in noise}
    series = {}
    for r in runs:
        if r["seed"] != SEEDS[0]:
            continue
        label = r["sampler"] + (f", cfg cut-off {r['cfg_cutoff']}" if r["cfg_cutoff"] is not None else "")
        series.setdefault(label, []).append(r)
    fewest = {}
    for label, rs in series.items():
        rs.sort(key=lambda r: r["unet_evaluations"])
        hit = next((r for r in rs if mean(r, measure) >= ref[measure] - noise[measure]), None)
        fewest[label] = hit["unet_evaluations"] if hit else None
    return {"reference": ref, "noise": noise, "series": series, "fewest": fewest, "measure": measure}


def report(out: Path, results_dir: Path, device: str = "2 CPU cores, ONNX Runtime CPU") -> Path:
    from sdrt.benchmarks import plots
    results = json.loads(out.read_text())
    s = summarize(results)
    ref, noise = s["reference"], s["noise"]
    sanity = results.get("fid_sanity") or fid_sanity(results["n"])
    lines = [f"# Quality per UNet evaluation, demo model (measured on {device})", "",
             f"`python -m sdrt.benchmarks.sampler_quality run WORK_DIR OUT.json --n {results['n']}`, then `report`: "
             f"the demo model exported FP32, {results['n']} seen + {results['n']} held-out captions (sdrt eval's "
             f"pick), guidance {results['guidance']}, one batch per split from one seed (0). UNet evaluations per "
             "image: 2 per guided step, 1 per step after the CFG cut-off. Measures, each the mean of the two "
             "splits: `attributes` = the checker's mean accuracy on colour, background, shape and size; "
             "`shape`, `position` = its accuracies; `all` = every attribute right incl. position; FID on the "
             "domain's features (not Inception).", "",
             "## What separates samplers here", "",
             f"- Domain FID ranks blur: rendered images blurred (σ = 0.6) score {sanity['seen']['blurred']:.1f} / "
             f"{sanity['held_out']['blurred']:.1f} (seen / held-out) against the sharp renders (0 = identical), "
             f"but renders of other captions score {sanity['seen']['other_captions']:.0f} / "
             f"{sanity['held_out']['other_captions']:.0f}: generated images sit at 1600-2000, dominated by "
             f"caption mismatches (position), and the same configuration with other seeds moves it by "
             f"{noise['fid']:.0f}. FID separates only the failures at 4-8 steps; it does not rank samplers.",
             f"- Position is ~{ref['position']:.0f}% for every sampler at every step count (the demo model has not "
             "learned it), so `all` is capped by it; `attributes` is the measure used below.",
             f"- Run-to-run noise (max - min over seeds {', '.join(map(str, SEEDS))} of DDIM-50 and of DPM++ 2M "
             f"Karras-12, the larger): attributes {noise['attributes']:.1f} points, all {noise['all']:.1f}, "
             f"shape {noise['shape']:.1f}, FID {noise['fid']:.0f}.",
             "- DDPM and Euler a give the same checker figures, as do DDIM and Euler (to within a read): with "
             "the same timesteps and noise they are the same update (ancestral DDPM = Euler ancestral, "
             "DDIM η = 0 = Euler on σ), computed in other arithmetic.",
             "- The demo model's scheduler has linear betas (σ_max ≈ 157, not SD's 14.6): the Karras schedule "
             "over that range spends its first steps at very high noise, so DPM++ 2M Karras needs more steps "
             "here than with SD's scaled-linear betas; the uniform DPM++ 2M row shows the solver itself.",
             "- LCM on a model that was not consistency-distilled is shown for completeness only.", "",
             f"Reference DDIM-50 (mean of 3 seeds): attributes {ref['attributes']:.1f}%, all {ref['all']:.1f}%, "
             f"shape {ref['shape']:.1f}%, FID {ref['fid']:.0f}.", "",
             "| sampler | steps | UNet evals | attributes % | shape % | position % | all % | FID |",
             "|---|---|---|---|---|---|---|---|"]
    for label, rs in s["series"].items():
        for r in rs:
            lines.append(f"| {label} | {r['steps']} | {r['unet_evaluations']} | {mean(r, 'attributes'):.1f} | "
                         f"{mean(r, 'shape'):.1f} | {mean(r, 'position'):.1f} | {mean(r, 'all'):.1f} | "
                         f"{mean(r, 'fid'):.0f} |")
    lines += ["", "Repeats (other seeds):", ""]
    for r in results["runs"].values():
        if r["seed"] != SEEDS[0]:
            lines.append(f"- {r['sampler']}-{r['steps']} seed {r['seed']}: attributes {mean(r, 'attributes'):.1f}%, "
                         f"shape {mean(r, 'shape'):.1f}%, all {mean(r, 'all'):.1f}%, FID {mean(r, 'fid'):.0f}")
    lines += ["", f"## Fewest UNet evaluations per image within the noise of DDIM-50 (attributes >= "
              f"{ref['attributes'] - noise['attributes']:.1f}%; DDIM-50 = 100 evaluations)", ""]
    for label, ev_ in s["fewest"].items():
        lines.append(f"- {label}: {ev_ if ev_ is not None else 'not reached'}"
                     + (f" ({100 / ev_:.1f}x fewer than DDIM-50)" if ev_ else ""))
    md = results_dir / "sampler-quality-demo-cpu.md"
    write_atomic(md, ("\n".join(lines) + "\n").encode())
    fig, (a1, a2) = plots.figure(2)
    pts = lambda m: [plots.Series(label, [r["unet_evaluations"] for r in rs], [mean(r, m) for r in rs])
                     for label, rs in s["series"].items()]
    plots.lines(a1, pts("attributes"), "UNet evaluations per image",
                "checker: colour/background/shape/size, % right")
    plots.lines(a2, pts("fid"), "UNet evaluations per image", "domain FID (lower is better)")
    versions = {"sdrt": __import__("sdrt").__version__}
    plots.save(fig, results_dir / "sampler-quality-demo-cpu.png",
               plots.caption(device, versions, f"demo model, n={results['n']} per split, guidance {results['guidance']}",
                             f"run-to-run noise: attributes {noise['attributes']:.1f} points, FID {noise['fid']:.0f}"))
    write_json_atomic(results_dir / "sampler-quality-demo-cpu.json", results)
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
