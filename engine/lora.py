"""LoRA at run time, without re-export or rebuild: read LoRA files (numpy, no torch), find the
export's initializer behind each LoRA module, and compute merged weights from the BASE weights
the export wrote.

    ΔW_i  = (α / r) · up @ down                      one LoRA module (Hu et al. 2021, eq. 3:
                                                     h = W₀x + (α/r)·B A x, B = up, A = down)
    W     = W₀ + Σ_i s_i · ΔW_i                      W₀ read from the export, never a previous merge

  α: kohya files store it per module (`NAME.alpha`, default r); diffusers/PEFT files in the
  safetensors metadata (`lora_adapter_metadata`: lora_alpha, alpha_pattern, use_rslora -> α/√r)
  or as `NAME.alpha` keys; without either α = r (scale 1), diffusers' convention.

Accepted key layouts (UNet and text encoder):
  diffusers / PEFT   unet.<module>.lora_A.weight, .lora_B.weight     text_encoder.<module>...
  older diffusers    unet.<...>.processor.to_q_lora.down.weight, <module>.lora.down.weight,
                     text_encoder.<module>.lora_linear_layer.down.weight
  kohya              lora_unet_<module_with_underscores>.lora_down.weight, .lora_up.weight, .alpha
                     lora_te_<module>... (text encoder)
Text-encoder module names come with or without the `text_model.` level (transformers 5 drops it).
Linear LoRA (down [r, in], up [out, r]) and conv LoRA (down [r, in, kh, kw], up [out, r, 1, 1])
both give ΔW = up·down reshaped to the weight's shape.

The export records, per graph, which ONNX initializer holds each torch Linear/Conv weight
(manifest["models"][name]["lora_targets"], `sdrt.export.lora_targets`): its name, whether the
exporter transposed it (Linear as MatMul), dtype, shape and where its bytes lie in the external
data file, so the base weights are read here with a memory map.
"""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdrt.contract import RUNTIME_MODELS
from sdrt.engine import request, tensor_files
from sdrt.errors import UserError, first_line

COMPONENTS = ("unet", "text_encoder")          # the export's models that LoRA modules target
TE_PREFIX = "text_model."                       # transformers 4 keeps it in module names, 5 drops it


# ---- reading a safetensors file (sdrt.engine.tensor_files: every offset checked) ------------------

def read_safetensors(path: Path) -> tuple[dict, dict]:
    """({name: array}, metadata) of a .safetensors file (read-only views of its bytes; BF16 as
    float32); UserError when unreadable."""
    try:
        return tensor_files.read_safetensors(path)
    except tensor_files.TensorFileError as e:
        raise UserError(f"cannot read LoRA {path}: {e.problem}; sdrt reads .safetensors LoRA files") from None


# ---- LoRA modules from the key layouts -----------------------------------------------------------

@dataclass
class Module:
    """One low-rank update: ΔW = scale · up @ down, for `name` in `component` (None: unknown)."""
    component: str | None
    name: str                       # module path (dots), or a kohya name (underscores)
    kohya: bool
    down: np.ndarray
    up: np.ndarray
    scale: float                    # α / r (or α / √r with rsLoRA)
    keys: list = field(default_factory=list)    # the file's keys this module consumed


@dataclass
class Lora:
    path: Path
    modules: list
    keys: int                        # tensors in the file
    unused: list                     # keys that belong to no LoRA module sdrt understands


def load(path: Path) -> Lora:
    tensors, meta = read_safetensors(path)
    modules, used = [], set()
    peft_meta = _peft_metadata(meta)
    for key in sorted(tensors):
        pair = _pair(key)
        if pair is None:
            continue
        stem, up_key, kind = pair
        if up_key not in tensors:
            continue
        down, up = tensors[key].astype(np.float32), tensors[up_key].astype(np.float32)
        keys = [key, up_key]
        alpha_key = stem + ".alpha"
        if down.ndim not in (2, 4) or down.shape[0] == 0:
            raise UserError(f"LoRA {path}: {key} has shape {list(down.shape)}, not a down weight "
                            "[rank, in] or [rank, in, kh, kw]: the file is damaged")
        rank = down.shape[0]
        alpha, rslora = float(rank), False
        if alpha_key in tensors:
            if tensors[alpha_key].size != 1:
                raise UserError(f"LoRA {path}: {alpha_key} holds {tensors[alpha_key].size} values, "
                                "not one: the file is damaged")
            alpha = float(tensors[alpha_key].reshape(-1)[0])
            keys.append(alpha_key)
        component, name, kohya = _module_name(stem, kind)
        if kind == "peft" and alpha_key not in tensors and component in peft_meta:
            try:
                alpha, rslora = _peft_alpha(peft_meta[component], name, rank)
            except (ValueError, TypeError, AttributeError, re.error) as e:
                raise UserError(f"LoRA {path}: its lora_adapter_metadata for {component} is malformed "
                                f"({first_line(e)}): the file is damaged") from None
        scale = alpha / (np.sqrt(rank) if rslora else rank)
        modules.append(Module(component, name, kohya, down, up, scale, keys))
        used.update(keys)
    return Lora(Path(path), modules, len(tensors), sorted(set(tensors) - used))


_PAIRS = [  # (suffix of the down key, suffix of the up key, layout)
    (".lora_A.weight", ".lora_B.weight", "peft"),
    (".lora_down.weight", ".lora_up.weight", "kohya"),
    (".lora.down.weight", ".lora.up.weight", "old"),
    ("_lora.down.weight", "_lora.up.weight", "old_attn"),       # attn1.processor.to_q_lora
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", "old"),
]


def _pair(key: str):
    """(stem, up key, layout) when `key` is a LoRA down (A) weight."""
    for down, up, kind in _PAIRS:
        if key.endswith(down):
            stem = key[:-len(down)]
            return stem, stem + up, kind
    return None


def _module_name(stem: str, kind: str) -> tuple[str | None, str, bool]:
    """(component, module name, kohya?) of a LoRA key stem."""
    if kind == "kohya" and stem.startswith(("lora_unet_", "lora_te_", "lora_te1_")):
        comp, rest = ("unet", stem[len("lora_unet_"):]) if stem.startswith("lora_unet_") else \
            ("text_encoder", stem.split("_", 2)[2])
        return comp, rest, True
    if kind == "kohya":
        return None, stem, True
    stem = stem.removeprefix("base_model.model.")  # PEFT's own adapter files
    for comp in COMPONENTS:
        if stem.startswith(comp + "."):
            stem = stem[len(comp) + 1:]
            break
    else:
        comp = "unet" if stem.startswith(("down_blocks", "mid_block", "up_blocks", "conv_", "time_")) else None
    if kind == "old_attn":  # attn1.processor.to_q_lora -> attn1.to_q (text encoder: q_proj)
        stem = stem.replace(".processor.", ".")
        head, _, proj = stem.rpartition(".")
        proj = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}[proj] \
            if comp == "text_encoder" else ("to_out.0" if proj == "to_out" else proj)
        stem = f"{head}.{proj}"
    return comp, stem, False


def _peft_metadata(meta: dict) -> dict:
    """{component: LoraConfig dict} from diffusers' `lora_adapter_metadata` ("unet.lora_alpha", ...)."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(flat, dict):
        return {}
    out = {}
    for key, value in flat.items():
        comp, _, field_name = key.partition(".")
        if comp in COMPONENTS:
            out.setdefault(comp, {})[field_name] = value
    return out


def _peft_alpha(config: dict, name: str, rank: int) -> tuple[float, bool]:
    """PEFT's α for module `name`: alpha_pattern (a pattern matching the name's tail) or lora_alpha."""
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern.lstrip('^')})", name):
            alpha = value
            break
    return float(alpha), bool(config.get("use_rslora", False))


# ---- matching LoRA modules to the export's initializers ------------------------------------------

def _plain(component: str, name: str) -> str:
    """Module name as matched: text-encoder names without the `text_model.` level."""
    return name[len(TE_PREFIX):] if component == "text_encoder" and name.startswith(TE_PREFIX) else name


def target_index(targets: dict) -> dict:
    """{(component, name or kohya name): (module path as exported, target)}."""
    index = {}
    for comp, entries in targets.items():
        for path, t in entries.items():
            plain = _plain(comp, path)
            index[(comp, plain)] = (path, t)
            index[(comp, "~" + plain.replace(".", "_"))] = (path, t)
    return index


def _lookup(index: dict, m: Module):
    if m.kohya and not m.component:  # lora_te2_ (SDXL), lora_transformer_ (DiT)...: not this model
        return None
    comps = [m.component] if m.component else list(COMPONENTS)
    for comp in comps:
        if m.kohya:  # underscores for dots: looked up in the table of exported names so written
            name = m.name[len("text_model_"):] if comp == "text_encoder" and m.name.startswith("text_model_") \
                else m.name
            name = "~" + name
        else:
            name = _plain(comp, m.name)
        hit = index.get((comp, name))
        if hit:
            return comp, hit
    return None


def factors(m: Module, shape: tuple) -> tuple | None:
    """(up [out, r] · scale, down [r, in·kh·kw]) with ΔW = up @ down reshaped to the torch weight's
    `shape`, or None when the shapes disagree (the product itself is formed only when merging)."""
    r = m.down.shape[0]
    if m.down.ndim not in (2, 4) or m.up.ndim != m.down.ndim or m.up.shape[1] != r \
            or m.up.size != m.up.shape[0] * r:
        return None
    up, down = m.up.reshape(m.up.shape[0], r), m.down.reshape(r, -1)
    if up.shape[0] != shape[0] or up.shape[0] * down.shape[1] != int(np.prod(shape)):
        return None
    return np.float32(m.scale) * up, down


@dataclass
class Resolved:
    """A LoRA whose every module found its initializer: [(component, target, (up, down))]."""
    path: Path
    deltas: list


def resolve(lora: Lora, targets: dict) -> Resolved:
    """Every module of `lora` must find a weight of this export with the right shape; else one
    UserError saying how many of the file's keys matched (a LoRA for another architecture)."""
    index = target_index(targets)
    deltas, matched, missing = [], 0, []
    for m in lora.modules:
        hit = _lookup(index, m)
        d = None
        if hit:
            comp, (path, t) = hit
            d = factors(m, torch_shape(t))
            if d is not None:
                if t.get("shared"):
                    raise UserError(f"LoRA {lora.path}: module {path} shares its ONNX initializer "
                                    f"{t['initializer']} with other weights of the export (identical "
                                    f"values were merged by the exporter): this LoRA cannot be applied to it")
                deltas.append((comp, t, d))
                matched += len(m.keys)
                continue
        missing.append(m.keys[0])
    if missing or lora.unused or not lora.modules:
        first = (missing or lora.unused or ["no LoRA keys"])[0]
        raise UserError(f"LoRA {lora.path}: {matched} of {lora.keys} keys match this model "
                        f"(first unmatched: {first}): is it for another architecture or a format sdrt "
                        f"does not read (LoRA in diffusers/PEFT or kohya layout)?")
    return Resolved(lora.path, deltas)


def torch_shape(t: dict) -> tuple:
    """The torch weight's shape (the ONNX initializer's, transposed back for MatMul weights)."""
    return tuple(reversed(t["shape"])) if t["transpose"] else tuple(t["shape"])


# ---- merged weights --------------------------------------------------------------------------------

def read_base(onnx_dir: Path, t: dict) -> np.ndarray:
    """The export's own value of an initializer (a read-only memory map of its external data)."""
    return np.memmap(Path(onnx_dir) / t["file"], dtype=np.dtype(t["dtype"]), mode="r",
                     offset=t["offset"], shape=tuple(t["shape"]))


def merged_weights(onnx_dir: Path, loras: list) -> dict:
    """{component: {initializer: merged array (ONNX layout and dtype)}} for [(Resolved, scale)]:
    W = W₀ + Σ s_i ΔW_i, from the base weights on disk (so switching never accumulates)."""
    parts = {}
    for resolved, s in loras:
        for comp, t, (up, down) in resolved.deltas:
            parts.setdefault((comp, t["initializer"]), (t, []))[1].append((np.float32(s) * up, down))
    out = {c: {} for c in COMPONENTS}
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # numpy drops the GIL in matmul and casts
        merged = pool.map(lambda item: _merge_one(onnx_dir, *item[1]), parts.items())
        for (comp, name), w in zip(parts, merged):
            out[comp][name] = w
    return out


def _merge_one(onnx_dir: Path, t: dict, terms: list) -> np.ndarray:
    w = np.array(read_base(onnx_dir, t), dtype=np.float32)       # W₀, ONNX layout
    for up, down in terms:
        if t["transpose"]:    # MatMul weight Wᵀ [in, out]: add ΔWᵀ = downᵀ upᵀ
            w += down.T @ up.T
        else:                 # [out, in] or [out, in, kh, kw]
            w.reshape(up.shape[0], -1)[...] += up @ down
    return w.astype(np.dtype(t["dtype"]))


def base_weights(onnx_dir: Path, targets: dict, names: dict) -> dict:
    """{component: {initializer: base array}} for the given {component: initializer names}
    (what a refit writes back when a LoRA is removed)."""
    by_init = {c: {t["initializer"]: t for t in entries.values()} for c, entries in targets.items()}
    return {c: {n: np.array(read_base(onnx_dir, by_init[c][n])) for n in ns} for c, ns in names.items()}


def parse_spec(spec) -> tuple[str, float]:
    """"FILE[:SCALE]" or (FILE, SCALE) -> (FILE, SCALE); SCALE defaults to 1 (request.parse_spec's rule)."""
    return request.parse_spec(spec, float, 1.0)


# ---- the LoRAs of one pipeline ----------------------------------------------------------------------

class LoraState:
    """Which LoRAs a pipeline's backend runs with, and which initializers differ from the export.

    Backends take {runtime model: {initializer: array}}: ONNX Runtime makes new sessions from the
    export with these tensors overriding its own (so only the LoRA's are passed); a refitting
    backend (TensorRT) changes weights in place, so the previous LoRA's initializers that the new
    one leaves alone are passed with their base values."""

    def __init__(self, work_dir: Path, manifest: dict):
        self.onnx_dir = Path(work_dir) / "onnx"
        recs = manifest["models"]
        self.targets = {c: recs[c]["lora_targets"] for c in COMPONENTS
                        if c in recs and recs[c].get("lora_targets") is not None}
        self.sources = {name: rec.get("weights_of", name) for name, rec in recs.items()   # runtime
                        if name in RUNTIME_MODELS and rec.get("weights_of", name) in self.targets}  # model -> component
        self.changed = {c: set() for c in COMPONENTS}
        self.applied: list = []

    def switch(self, backend, loras) -> dict:
        import time
        t0 = time.perf_counter()
        loras = [(Path(p), _check_scale(p, s)) for p, s in loras]
        if loras and not self.targets:
            raise UserError("this export records no LoRA map (it predates LoRA support): run `sdrt export` again")
        resolved = [(resolve(load(p), self.targets), s) for p, s in loras]
        t1 = time.perf_counter()
        merged = merged_weights(self.onnx_dir, resolved)
        changed = {c: set(merged[c]) for c in COMPONENTS}
        if backend.refits:
            restore = {c: self.changed[c] - changed[c] for c in self.targets}
            for c, arrays in base_weights(self.onnx_dir, self.targets, restore).items():
                merged[c].update(arrays)
        t2 = time.perf_counter()
        backend.set_weights({m: merged[c] for m, c in self.sources.items()})
        t3 = time.perf_counter()
        self.changed, self.applied = changed, loras
        return {"read_ms": (t1 - t0) * 1e3, "merge_ms": (t2 - t1) * 1e3, "apply_ms": (t3 - t2) * 1e3,
                "weights": sum(len(v) for v in changed.values())}


def _check_scale(path, scale) -> float:
    try:
        s = float(scale)
    except (TypeError, ValueError):
        s = float("nan")
    if not np.isfinite(s):
        raise UserError(f"LoRA {path}: scale {scale!r} is not a finite number")
    return s
