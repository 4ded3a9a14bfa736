"""How long switching LoRA takes on a work folder, without re-export or rebuild.

    sdrt bench-lora WORK_DIR [--rank 16] [--backend onnxruntime-cpu] [--steps 1] [--size PX] [--out DIR]

Writes two random kohya-layout LoRA files shaped for the export (from its weight map): one on the
transformer blocks and the text encoder (what most community LoRAs train), one on every
Linear/Conv weight (LoCon). Then, on one pipeline: the base image, each LoRA, both, and back to
none; for each switch the time to read the files, merge W0 + sum s*dW, hand the weights to the
backend, and the next generate's setup (new ONNX Runtime sessions / TensorRT bindings and CUDA
graphs). Results go to OUT (default ./sdrt-results) as .md and .json named after the export and
the device.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from sdrt import manifest as mf
from sdrt.engine import lora as L
from sdrt.fileio import write_atomic


def random_lora(path: Path, targets: dict, rank: int, everything: bool, seed: int) -> int:
    """A kohya-layout file; returns the number of modules."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    tensors = {}
    for comp, entries in targets.items():
        for name, t in entries.items():
            if not everything and comp == "unet" and ".attentions." not in name:
                continue
            shape = L.torch_shape(t)
            key = ("lora_unet_" if comp == "unet" else "lora_te_") + name.replace(".", "_")
            tensors[key + ".lora_down.weight"] = (rng.standard_normal((rank, *shape[1:])) * 0.01).astype(np.float16)
            tensors[key + ".lora_up.weight"] = (rng.standard_normal((shape[0], rank) + (1, 1) * (len(shape) == 4))
                                                * 0.01).astype(np.float16)
            tensors[key + ".alpha"] = np.array(rank / 2, np.float16)
    save_file(tensors, str(path))
    return len(tensors) // 3


def measure(work: Path, backend: str, rank: int, tmp: Path, steps: int, size: int | None) -> dict:
    from sdrt.engine.pipeline import Pipeline
    man = mf.load(work)
    targets = {c: man["models"][c]["lora_targets"] for c in L.COMPONENTS}
    files = {"attn+te": tmp / "attn_te.safetensors", "locon": tmp / "locon.safetensors"}
    modules = {k: random_lora(p, targets, rank, k == "locon", i) for i, (k, p) in enumerate(files.items())}
    pipe = Pipeline(work, backend=backend)
    run = lambda: pipe.generate("a fox", steps=steps, seed=0, height=size, width=size).timings
    t0 = time.perf_counter()
    first = run()
    rows = [{"switch": "none (first generate)", "setup_ms": first["setup_ms"], "total_s": time.perf_counter() - t0}]
    for label, loras in [("attn+te", [(files["attn+te"], 0.8)]), ("locon", [(files["locon"], 0.8)]),
                         ("both", [(files["attn+te"], 0.6), (files["locon"], 0.4)]), ("none", [])]:
        t0 = time.perf_counter()
        t = pipe.set_loras(loras)
        timings = run()
        rows.append({"switch": label, "weights": t["weights"], "read_ms": t["read_ms"], "merge_ms": t["merge_ms"],
                     "apply_ms": t["apply_ms"], "setup_ms": timings["setup_ms"],
                     "switch_ms": t["read_ms"] + t["merge_ms"] + t["apply_ms"] + timings["setup_ms"],
                     "total_s": time.perf_counter() - t0})
    return {"work_dir": str(work), "backend": pipe.backend_name, "precision": man.get("precision"),
            "rank": rank, "modules": modules, "device": device(), "rows": rows}


def device() -> str:
    return f"cpu-{platform.machine()}-{os.cpu_count()}-cores"


def table(r: dict) -> str:
    lines = [f"LoRA switch, {r['work_dir']} ({r['precision']}), {r['backend']}, {r['device']}, rank {r['rank']}, "
             f"modules {r['modules']}", "",
             "| switch to | weights | read ms | merge ms | to backend ms | next setup ms | switch ms |",
             "|---|---|---|---|---|---|---|"]
    for row in r["rows"][1:]:
        lines.append(f"| {row['switch']} | {row['weights']} | {row['read_ms']:.0f} | {row['merge_ms']:.0f} | "
                     f"{row['apply_ms']:.0f} | {row['setup_ms']:.0f} | {row['switch_ms']:.0f} |")
    lines.append(f"\nfirst generate's setup (sessions from the export): {r['rows'][0]['setup_ms']:.0f} ms")
    return "\n".join(lines)


def bench_lora(work_dir: Path, backend: str = "onnxruntime-cpu", rank: int = 16, steps: int = 1,
               size: int | None = None, out: Path = Path("sdrt-results")) -> list[Path]:
    """Measure, print the table, write OUT/lora-switch-<work dir>-<device>.md and .json; returns
    the files written."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(Path(work_dir), backend, rank, Path(tmp), steps, size)
    text = table(r)
    print(text)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"lora-switch-{Path(work_dir).name}-{r['device']}"
    paths = [stem.with_suffix(".md"), stem.with_suffix(".json")]
    write_atomic(paths[0], text + "\n")
    write_atomic(paths[1], json.dumps(r, indent=1) + "\n")
    return paths
