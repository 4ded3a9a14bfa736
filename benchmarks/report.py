"""Benchmark records -> JSON, markdown tables and a PNG (all written atomically); and
`sdrt bench --compare`: two or more result files side by side, matched by configuration.

A record is one sdrt contender (export x backend) at one configuration (size, steps, batch, mode),
with min / median / max per stage over its runs (`stages`) and its reference's (`reference_stages`).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from sdrt.errors import UserError
from sdrt.fileio import write_atomic, write_json_atomic

# stage key -> label in tables and plots, in the order the bars stack (bottom first)
STAGE_LABELS = {"tokenize": "tokenize", "text_encoder": "text encoder", "vae_encoder": "VAE encoder",
                "denoise": "denoise", "vae_decoder": "VAE decoder"}
PSNR_AGREE_DB = 30.0       # below: sdrt and the reference made different images
NOISY = 0.10               # a spread (max - min) above this share of the median: a noisy machine


def export_label(r: dict) -> str:
    """Which export: its folder name, precision and attention form."""
    name = f"{r['export']}: " if r.get("export") else ""
    fused = ", ORT fusion" if r.get("ort_fusion") else ""
    return f"{name}{r.get('precision', '?')}, attention {r.get('attention', 'decomposed')}{fused}"


def size_label(r: dict) -> str:
    mode = r.get("mode", "txt2img")
    extra = "" if mode == "txt2img" else f", {mode} ({r.get('steps_run')} run)"
    return f"{r['height']}x{r['width']}x{r['steps']} steps{extra}"


def config_key(r: dict) -> tuple:
    """What makes two records comparable: size, steps, batch, mode, strength."""
    return (r["height"], r["width"], r["steps"], r["batch"], r.get("mode", "txt2img"), r.get("strength"))


def config_label(r: dict) -> str:
    mode = r.get("mode", "txt2img")
    return f"{r['height']}x{r['width']}, batch {r['batch']}" + ("" if mode == "txt2img" else f", {mode}")


def contender_key(r: dict) -> tuple:
    return (r["backend"], export_label(r))


def ms_range(s: dict | None, fmt: str = "{:.1f}") -> str:
    """"median (min-max)" of a stage's stats."""
    if not s:
        return "-"
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def psnr_cell(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v >= PSNR_AGREE_DB else f"**{v:.1f} (< {PSNR_AGREE_DB:.0f}: differ)**"


# (header, record key or function of the record, format)
COLUMNS = [("backend", "backend", "{}"), ("export", export_label, "{}"), ("size", size_label, "{}"),
           ("batch", "batch", "{}"), ("runs", "runs", "{}"),
           ("e2e ms (min-max)", lambda r: ms_range(r.get("stages", {}).get("total")), "{}"),
           ("ref e2e ms (min-max)", lambda r: ms_range((r.get("reference_stages") or {}).get("total")) or None, "{}"),
           ("speedup", "speedup_e2e", "{:.2f}x"), ("step ms", "unet_step_ms", "{:.2f}"),
           ("ref step ms", "reference_unet_step_ms", "{:.2f}"), ("img/s", "images_per_s", "{:.2f}"),
           ("peak MB", "peak_mem_mb", "{:.0f}"), ("PSNR dB", lambda r: psnr_cell(r.get("psnr_vs_reference")), "{}"),
           ("step graph", "graph", "{}")]


def markdown(header: list, rows: list) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def stage_rows(records: list[dict]) -> list[tuple[str, dict, dict]]:
    """(contender name, record, its stage stats) for every sdrt record and each configuration's
    reference once, in the records' order."""
    out, seen = [], set()
    for r in records:
        out.append((f"sdrt {r['backend']} ({export_label(r)})", r, r["stages"]))
    for r in records:
        if r.get("reference_stages") and config_key(r) not in seen:
            seen.add(config_key(r))
            out.append((r["reference"], r, r["reference_stages"]))
    return out


def noisy(records: list[dict]) -> list[str]:
    """"contender, configuration: stage N %" for each contender and configuration whose runs'
    spread (max - min) exceeds NOISY of the median, in the total or a stage that is at least a
    tenth of it (the tokenizer's 0.1 ms jitter is no news); the widest stage is named."""
    found = []
    for name, r, st in stage_rows(records):
        total = st["total"]["median"]
        shares = {stage: (s["max"] - s["min"]) / s["median"] for stage in ("total", *STAGE_LABELS)
                  if (s := st.get(stage)) and s["median"] > 0 and (stage == "total" or s["median"] >= 0.1 * total)}
        worst = max(shares, key=shares.get, default=None)
        if worst is not None and shares[worst] > NOISY:
            found.append(f"{name}, {config_label(r)}: {STAGE_LABELS.get(worst, worst)} {shares[worst]:.0%}")
    return found


def noisy_line(found: list[str]) -> str | None:
    if not found:
        return None
    shown = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
    return (f"noisy machine: compare within one run (the runs' spread exceeds {NOISY:.0%} of the median: "
            f"{shown})")


def table(records: list[dict]) -> str:
    rows = []
    for r in records:
        cells = []
        for _, key, fmt in COLUMNS:
            v = key(r) if callable(key) else r.get(key)
            cells.append("-" if v is None else fmt.format(v))
        rows.append(cells)
    lines = markdown([c[0] for c in COLUMNS], rows)
    if not records:
        return "\n".join(lines)
    lines += ["", "Where the time goes, ms: median (min-max) of the runs"]
    stages = [s for s in STAGE_LABELS if any(st.get(s) for _, _, st in stage_rows(records))]
    lines += markdown(["contender", "size", "batch", "runs", *(STAGE_LABELS[s] for s in stages), "total"],
                      [[name, size_label(r), str(r["batch"]), str(r["runs"]),
                        *(ms_range(st.get(s)) for s in stages), ms_range(st["total"])]
                       for name, r, st in stage_rows(records)])
    r0 = records[0]
    if r0.get("reference"):
        lines.append(f"\nreference (ref columns): {r0['reference']}, same process, latents, prompt and guidance")
    if r0.get("prompt") is not None:
        lines.append(f"\nprompt: {r0['prompt']!r}, negative: {r0['negative']!r}, guidance {r0['guidance']}; "
                     + ("runs interleaved (A B A B ...)" if r0.get("interleaved") else "runs one contender after another"))
    low = [r for r in records if r.get("psnr_vs_reference") is not None and r["psnr_vs_reference"] < PSNR_AGREE_DB]
    if low:
        lines.append(f"\nPSNR under {PSNR_AGREE_DB:.0f} dB: sdrt's images differ from the reference's for "
                     + ", ".join(f"{r['backend']} ({export_label(r)}) {config_label(r)}" for r in low)
                     + ": a parity problem, not a speed result")
    for backend, err in sorted({(r["backend"], r["graph_error"]) for r in records if r.get("graph_error")}):
        lines.append(f"\n{backend}: step graph: {err}")
    warning = noisy_line(noisy(records))
    if warning:
        lines.append(f"\n{warning}")
    lines.append(f"\ndevice: {r0['device']}; versions: " + ", ".join(f"{k} {v}" for k, v in r0["versions"].items()))
    return "\n".join(lines)


# ---- the plot -------------------------------------------------------------------------------------

def bar_of(label: str, st: dict, note: str = ""):
    """A plots.Bar from stage stats: the stages' medians stacked, "other" the rest of the median
    total (scheduler, copies, Python), whiskers the total's min-max."""
    from sdrt.benchmarks.plots import Bar
    segments = {STAGE_LABELS[s]: st[s]["median"] for s in STAGE_LABELS if st.get(s)}
    rest = st["total"]["median"] - sum(segments.values())
    if rest > 0:
        segments["other"] = rest
    return Bar(label, segments, low=st["total"]["min"], high=st["total"]["max"], note=note)


def short_name(r: dict) -> str:
    """Two lines under a bar: sdrt and the backend; the export (+ fusion)."""
    fused = " +fusion" if r.get("ort_fusion") else ""
    return f"sdrt {r['backend'].replace('onnxruntime', 'ort')}\n{r.get('export') or r.get('precision', '')}{fused}"


def sdrt_note(r: dict) -> str:
    note = f"{r['speedup_e2e']:.2f}x" if r.get("speedup_e2e") else ""
    if r.get("psnr_vs_reference") is not None and r["psnr_vs_reference"] < PSNR_AGREE_DB:
        note += f"\nPSNR {r['psnr_vs_reference']:.0f} dB!"
    return note


def plot(records: list[dict], path: Path) -> None:
    """Per configuration, stacked bars of where the time goes (sdrt contenders and the reference
    side by side, the speed-up on sdrt's bars); a second panel of ms per image over batch (or over
    size) only when the run has more than one."""
    from sdrt.benchmarks import plots
    groups = {}
    for r in records:
        groups.setdefault(config_key(r), (config_label(r), []))[1].append(bar_of(short_name(r), r["stages"],
                                                                                sdrt_note(r)))
    for r in records:
        bars = groups[config_key(r)][1]
        if r.get("reference_stages") and not any(b.label == "diffusers" for b in bars):
            bars.append(bar_of("diffusers", r["reference_stages"]))
    n_bars = sum(len(b) for _, b in groups.values())
    over = lines_over(records)
    widths = [max(5.0, 0.85 * n_bars + 0.6 * len(groups) + 2.5)] + ([5.5] if over else [])
    fig, axes = plots.figure(len(widths), width=widths, height=4.6)
    r0 = records[0]
    plots.stacked_bars(axes[0], list(groups.values()), f"ms per generation (median; whiskers: min-max)",
                       f"where the time goes: {r0['steps']} DDIM steps")
    if over:
        plots.lines(axes[1], over[1], over[0], "ms per image (median, min-max)", "per image")
    text = plots.caption(r0["device"], r0["versions"],
                         f"{r0['runs']} runs per contender" + (", interleaved" if r0.get("interleaved") else ""),
                         f"speed-up: diffusers' median end to end / sdrt's; reference: {r0['reference']}"
                         if r0.get("reference") else "no reference")
    plots.save(fig, path, text)


def lines_over(records: list[dict]):
    """(x label, [plots.Series]) of ms per image over batch, or over size when there is one batch
    and several sizes; None when the run has one of each."""
    from sdrt.benchmarks.plots import Series
    batches = sorted({r["batch"] for r in records})
    sizes = sorted({(r["height"], r["width"]) for r in records})
    if len(batches) < 2 and len(sizes) < 2:
        return None
    by_batch = len(batches) > 1
    x_of = (lambda r: r["batch"]) if by_batch else (lambda r: r["height"] * r["width"] / 1e3)
    lines = {}
    for name, r, st in stage_rows(records):
        name = short_name(r).replace("\n", " ") if name.startswith("sdrt") else "diffusers"
        label = name + (f", {r['height']}x{r['width']}" if by_batch and len(sizes) > 1 else "")
        lines.setdefault(label, []).append((x_of(r), *(st["total"][k] / r["batch"] for k in ("median", "min", "max"))))
    series = []
    for label, points in lines.items():
        points.sort()
        series.append(Series(label, [p[0] for p in points], [p[1] for p in points],
                             low=[p[2] for p in points], high=[p[3] for p in points]))
    return ("batch" if by_batch else "pixels (thousands)"), series


# ---- files ----------------------------------------------------------------------------------------

def device_slug(device: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()


def write(records: list[dict], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench-{device_slug(records[0]['device'])}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    write_json_atomic(paths[0], {"records": records})
    write_atomic(paths[1], table(records) + "\n")
    plot(records, paths[2])
    return paths


# ---- --compare ------------------------------------------------------------------------------------

def load_results(path: Path) -> list[dict]:
    try:
        records = json.loads(Path(path).read_text())["records"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--compare {path}: not a result of sdrt bench ({type(e).__name__}: {e}): "
                        "give the .json files sdrt bench wrote") from None
    if not records or any("stages" not in r for r in records):
        raise UserError(f"--compare {path}: no per-stage min/median/max (an older sdrt bench, or no records): "
                        "run sdrt bench again and compare its .json")
    return records


def file_labels(paths: list[Path]) -> list[str]:
    """Short names of the files: their stems less what all of them share at the start."""
    stems = [Path(p).stem for p in paths]
    prefix = 0
    while all(len(s) > prefix + 1 for s in stems) and len({s[prefix] for s in stems}) == 1:
        prefix += 1
    cut = stems[0].rfind("-", 0, prefix) + 1 if prefix else 0
    labels = [s[cut:] for s in stems]
    return labels if len(set(labels)) == len(labels) else [f"{i + 1}: {s}" for i, s in enumerate(stems)]


def match(files: list[list[dict]]) -> tuple[list[tuple[str, str, list[dict]]], list[str]]:
    """Rows [(configuration, contender, [stage stats per file])] and what could not be matched.
    Per configuration: the same contender (backend, export) in every file; else, when every file
    has exactly one sdrt record there (two backends, two machines), those; and the reference when
    every file has the same one."""
    rows, unmatched = [], []
    by_config = [{} for _ in files]
    for per, records in zip(by_config, files):
        for r in records:
            per.setdefault(config_key(r), []).append(r)
    for key in [k for k in by_config[0] if all(k in per for per in by_config[1:])]:
        groups = [per[key] for per in by_config]
        label = config_label(groups[0][0]) + f", {groups[0][0]['steps']} steps"
        common = [c for c in dict.fromkeys(contender_key(r) for r in groups[0])
                  if all(any(contender_key(r) == c for r in g) for g in groups[1:])]
        if common:
            for c in common:
                rs = [next(r for r in g if contender_key(r) == c) for g in groups]
                rows.append((label, f"sdrt {c[0]} ({c[1]})", [r["stages"] for r in rs]))
        elif all(len(g) == 1 for g in groups):
            rows.append((label, " vs ".join(dict.fromkeys(f"sdrt {r['backend']} ({export_label(r)})"
                                                          for r in (g[0] for g in groups))),
                         [g[0]["stages"] for g in groups]))
        else:
            unmatched.append(f"{label}: no contender in every file")
        refs = [g[0].get("reference_stages") for g in groups]
        names = {g[0].get("reference") for g in groups}
        if all(refs) and len(names) == 1:
            rows.append((label, names.pop(), refs))
    for i, per in enumerate(by_config[1:], 1):
        for key in per:
            if key not in by_config[0]:
                unmatched.append(f"{config_label(per[key][0])}, {key[2]} steps: only from file {i + 1} on")
    for key in by_config[0]:
        if not all(key in per for per in by_config[1:]):
            unmatched.append(f"{config_label(by_config[0][key][0])}, {key[2]} steps: not in every file")
    return rows, unmatched


def overlap(a: dict, b: dict) -> bool:
    """Do two runs' min-max ranges overlap (then the difference may be the machine's noise)?"""
    return max(a["min"], b["min"]) <= min(a["max"], b["max"])


def compare_table(paths: list[Path], labels: list[str], rows: list, unmatched: list[str]) -> str:
    header = ["configuration", "contender", *(f"{lab} e2e ms (min-max)" for lab in labels)]
    for lab in labels[1:]:
        header += [f"{lab} / {labels[0]}", "spreads overlap"]
    body = []
    for config, contender, stats in rows:
        cells = [config, contender, *(ms_range(s["total"]) for s in stats)]
        base = stats[0]["total"]
        for s in stats[1:]:
            cells += [f"{s['total']['median'] / base['median']:.3f}",
                      "yes: within the noise" if overlap(s["total"], base) else "no"]
        body.append(cells)
    lines = [f"Comparison of {len(paths)} sdrt bench results (time ratio < 1: faster than {labels[0]})", ""]
    lines += [f"- {lab}: {p}" for lab, p in zip(labels, paths)]
    lines += ["", *markdown(header, body)]
    if unmatched:
        lines.append("\nnot compared: " + "; ".join(unmatched))
    return "\n".join(lines)


def compare_plot(labels: list[str], rows: list, path: Path, devices: list[str], versions: list[dict]) -> None:
    """Per (configuration, contender): one stacked bar per file, the time ratio to the first on the others."""
    from sdrt.benchmarks import plots
    groups = []
    for config, contender, stats in rows:
        base = stats[0]["total"]["median"]
        bars = [bar_of(lab, s, "" if i == 0 else f"{s['total']['median'] / base:.2f}x time")
                for i, (lab, s) in enumerate(zip(labels, stats))]
        groups.append((f"{config}\n{contender.replace(' (', chr(10) + '(')}", bars))
    n_bars = sum(len(b) for _, b in groups)
    fig, (ax,) = plots.figure(1, width=max(6.0, 0.9 * n_bars + 0.6 * len(groups) + 2.5), height=5.0)
    plots.stacked_bars(ax, groups, "ms per generation (median; whiskers: min-max)",
                       f"compared: {', '.join(labels)}")
    same = len(set(devices)) == 1
    text = plots.caption(devices[0] if same else " / ".join(devices), versions[0],
                         "" if same else "different devices",
                         "time ratio to the first file written on the bars")
    plots.save(fig, path, text)


def compare(paths: list, out_dir: Path) -> list[Path]:
    """`sdrt bench --compare`: table and plot of two or more result files; returns the files written."""
    if len(paths) < 2:
        raise UserError("--compare needs two or more result files (.json written by sdrt bench)")
    files = [load_results(p) for p in paths]
    rows, unmatched = match(files)
    if not rows:
        raise UserError(f"--compare: {', '.join(map(str, paths))} share no configuration (size, steps, batch, "
                        "mode): compare results measured at the same --sizes, --steps and --batches")
    labels = file_labels(paths)
    text = compare_table(paths, labels, rows, unmatched)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    md, png = stem.with_suffix(".md"), stem.with_suffix(".png")
    write_atomic(md, text + "\n")
    compare_plot(labels, rows, png, [f[0]["device"] for f in files], [f[0]["versions"] for f in files])
    print(text)
    return [md, png]
