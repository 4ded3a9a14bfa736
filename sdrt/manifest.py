"""WORK_DIR/manifest.json: what an export holds, read by builder and runtime alike.

Layout of a work folder:
  manifest.json            this file
  onnx/*.onnx (+ .data)    one graph per model of sdrt.contract
  tokenizer/               tokenizer files copied from the pipeline folder
  scheduler/scheduler_config.json
  engines/<backend>/*.plan built engines, keyed in manifest["engines"]
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from sdrt.contract import Model, ModelConfig, Step
from sdrt.errors import UserError

FORMAT = 1
NAME = "manifest.json"


def sha256_file(path: Path) -> str:
    return files_sha256([Path(path)])


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load(work_dir: Path) -> dict:
    work_dir = Path(work_dir)
    path = work_dir / NAME
    if not work_dir.is_dir():
        raise UserError(f"{work_dir} is not a folder: give the WORK_DIR written by `sdrt export`")
    if not path.is_file():
        raise UserError(f"{work_dir} has no {NAME}: it is not an sdrt export (run `sdrt export` first)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable or corrupt ({e}): export again") from None
    if data.get("format") != FORMAT or "models" not in data:
        raise UserError(f"{path} is not an sdrt manifest of format {FORMAT}: export again")
    return data


def models(manifest: dict) -> dict[str, Model]:
    """Every model's contract, step graphs with their Step (exports that did not record it: the
    step of that name, derived here once)."""
    out = {}
    for name, rec in manifest["models"].items():
        model = Model.from_json(name, rec["contract"])
        if "step" not in rec["contract"]:
            model = replace(model, step=Step.named(name))
        out[name] = model
    return out


def config(manifest: dict) -> ModelConfig:
    return ModelConfig.from_json(manifest["config"])


def model_precision(manifest: dict, name: str) -> str:
    """fp16 or fp32 of one model, as recorded in manifest["models"][name]["precision"]:
    --vae-precision / --text-encoder-precision may differ from the export's --precision (which the
    UNet and the step graphs always follow). Older manifests: their "precisions" table, else the
    export's precision."""
    rec = manifest.get("models", {}).get(name, {})
    return rec.get("precision") or manifest.get("precisions", {}).get(name) or manifest.get("precision", "fp16")


def precision_label(manifest: dict) -> str:
    """"fp16", or "fp16 (vae_decoder fp32)" when a model differs from the UNet."""
    base = manifest.get("precision", "fp16")
    odd = [f"{n} {p}" for n in manifest.get("models", {}) if (p := model_precision(manifest, n)) != base]
    return base + (f" ({', '.join(odd)})" if odd else "")


def onnx_path(work_dir: Path, model: Model, manifest: dict | None = None, variant: str | None = None) -> Path:
    """The graph of `model`: onnx/<file>, or the variant's (e.g. onnx/ort/<file>) when asked for
    and exported."""
    rec = (manifest or {}).get("variants", {}).get(variant, {}).get(model.name) if variant else None
    return Path(work_dir) / "onnx" / (rec["files"][0] if rec else model.onnx)


def model_files(work_dir: Path, manifest: dict, name: str) -> list[Path]:
    """The files model `name` consists of, under WORK_DIR/onnx: its .onnx, then the external data
    files it refers to, as `sdrt export` recorded them in manifest["models"][name]["files"]
    (manifests without "files": the .onnx alone). UserError when any is missing."""
    rec = manifest["models"][name]
    names = rec.get("files") or [Model.from_json(name, rec["contract"]).onnx]
    onnx_dir = Path(work_dir) / "onnx"
    path = onnx_dir / names[0]
    if not path.is_file():
        raise UserError(f"{path} is missing: the export is incomplete, export again")
    files = [path]
    for extra in names[1:]:
        p = onnx_dir / extra
        if not p.is_file():
            raise UserError(f"{path} needs its external data {extra}, which is missing: export again")
        files.append(p)
    return files


def files_sha256(files: list[Path], chunk: int = 1 << 22) -> str:
    """sha256 over the bytes of `files` one after another (== sha256_file for a single file)."""
    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()
