"""Check each exported graph on ONNX Runtime CPU against its float32 PyTorch module.

Error measure: relative L2, ||onnx - torch|| / ||torch||, on the same random inputs, at a shape
other than the one traced (so the dynamic axes are exercised too). The reference is always the
float32 module: for an FP16 export the figure is the FP16 error itself.

Tolerances (relative L2), documented in README:
  fp32: 1e-4  -- ORT and torch differ only in kernel summation order
  fp16: 1e-2  -- fp16 rounding; measured 1.4e-5..5.8e-4 on tiny and sd15 (random weights)
The measured values are recorded in manifest.json (models.<name>.validation).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sdrt.contract import Model
from sdrt.errors import UserError

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


def rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def run_onnx(path: Path, inputs: dict) -> list[np.ndarray]:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def run_torch(module, model: Model, inputs: dict) -> list[np.ndarray]:
    import torch
    args = []
    for t in model.inputs:
        x = torch.from_numpy(np.ascontiguousarray(inputs[t.name]))
        args.append(x.float() if x.is_floating_point() else x)
    with torch.no_grad():
        out = module(*args)
    return [o.float().numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]


def check(model: Model, got: list[np.ndarray], ref: list[np.ndarray], precision: str) -> dict:
    """Compare outputs; raise if over tolerance. Returns the record for the manifest."""
    tol = TOLERANCE[precision]
    errors = {}
    for t, a, b in zip(model.outputs, got, ref):
        if not np.all(np.isfinite(a)):
            raise UserError(f"{model.name}: ONNX output {t.name} has NaN/Inf on ONNX Runtime CPU "
                            f"({precision}); export with --precision fp32 or report this model")
        errors[t.name] = {"rel_l2": rel_l2(a, b), "max_abs": float(np.abs(a.astype(np.float64) - b).max())}
    worst = max(e["rel_l2"] for e in errors.values())
    record = {"outputs": errors, "rel_l2": worst, "tolerance": tol, "runtime": "onnxruntime-cpu",
              "reference": "torch float32"}
    if worst > tol:
        raise UserError(f"{model.name}: ONNX Runtime differs from PyTorch by relative L2 {worst:.2e} "
                        f"> tolerance {tol:.0e} ({precision}); the export is wrong, nothing was written")
    return record
