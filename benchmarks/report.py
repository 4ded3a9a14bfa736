"""Benchmark records -> JSON, markdown table and PNG plot (all written atomically)."""
from __future__ import annotations

import re
import time
from pathlib import Path

from sdrt.fileio import atomic_path, write_atomic, write_json_atomic


def export_label(r: dict) -> str:
    """Which export: its folder name, precision and attention form."""
    name = f"{r['export']}: " if r.get("export") else ""
    return f"{name}{r.get('precision', '?')}, attention {r.get('attention', 'decomposed')}"


def size_label(r: dict) -> str:
    return f"{r['height']}x{r['width']}x{r['steps']} steps"


# (header, record key or function of the record, format)
COLUMNS = [("backend", "backend", "{}"), ("export", export_label, "{}"), ("size", size_label, "{}"), ("batch", "batch", "{}"),
           ("e2e ms", "e2e_ms", "{:.1f}"), ("ref e2e ms", "reference_e2e_ms", "{:.1f}"),
           ("speedup", "speedup_e2e", "{:.2f}x"), ("step ms", "unet_step_ms", "{:.2f}"),
           ("ref step ms", "reference_unet_step_ms", "{:.2f}"), ("text enc ms", "text_encoder_ms", "{:.2f}"),
           ("vae ms", "vae_ms", "{:.1f}"), ("img/s", "images_per_s", "{:.2f}"),
           ("peak MB", "peak_mem_mb", "{:.0f}"), ("PSNR dB", "psnr_vs_reference", "{:.1f}"),
           ("step graph", "graph", "{}")]


def table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in records:
        cells = []
        for _, key, fmt in COLUMNS:
            v = key(r) if callable(key) else r.get(key)
            cells.append("-" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    if records:
        if records[0].get("reference"):
            lines.append(f"\nreference (ref columns): {records[0]['reference']}, same process, latents and prompt")
        for backend, err in sorted({(r["backend"], r["graph_error"]) for r in records if r.get("graph_error")}):
            lines.append(f"\n{backend}: step graph: {err}")
        lines.append(f"\ndevice: {records[0]['device']}; versions: "
                     + ", ".join(f"{k} {v}" for k, v in records[0]["versions"].items()))
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for backend, label in sorted({(r["backend"], export_label(r)) for r in records}):
        rs = sorted((r for r in records if (r["backend"], export_label(r)) == (backend, label)),
                    key=lambda r: r["batch"])
        name = f"sdrt {backend} ({label})"
        axes[0].plot([r["batch"] for r in rs], [r["e2e_ms"] for r in rs], "o-", label=name)
        axes[1].plot([r["batch"] for r in rs], [r["images_per_s"] for r in rs], "o-", label=name)
    ref = sorted({(r["batch"], r["reference_e2e_ms"]) for r in records if r.get("reference_e2e_ms")})
    if ref:
        axes[0].plot([b for b, _ in ref], [ms for _, ms in ref], "s--", color="gray", label="diffusers eager")
        axes[1].plot([b for b, _ in ref], [b / (ms / 1e3) for b, ms in ref], "s--", color="gray",
                     label="diffusers eager")
    r0 = records[0]
    axes[0].set(xlabel="batch", ylabel="end to end ms (median)",
                title=f"{r0['height']}x{r0['width']}, {r0['steps']} DDIM steps")
    axes[1].set(xlabel="batch", ylabel="images / s", title=r0["device"])
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def write(records: list[dict], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9]+", "-", records[0]["device"]).strip("-").lower()
    stem = out_dir / f"bench-{device}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    write_json_atomic(paths[0], {"records": records})
    write_atomic(paths[1], table(records) + "\n")
    plot(records, paths[2])
    return paths

