"""Features for the demo domain's FID: a small MLP classifier of sdrt.scenes images, run in numpy.

FID here is FID on this domain (Fréchet distance between Gaussians fitted to these features of
generated and dataset images), not Inception-FID: the numbers compare runs of the demo model with
each other, not with published SD FIDs. The weights (benchmarks/scene_features.npz) are trained
once by benchmarks/train_scene_features.py (torch) and committed.

    x  = the 32x32x3 image scaled to [-1, 1], flattened
    h1 = relu(W1 x + b1)          256
    f  = relu(W2 h1 + b2)         128: the features
    logits = W3 f + b3            colour 8 | background 8 | shape 3 | size 2 | position 9
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sdrt import scenes

WEIGHTS = Path(__file__).with_name("scene_features.npz")
HEADS = {"colour": scenes.COLOURS, "background": scenes.COLOURS, "shape": scenes.SHAPES,
         "size": tuple(scenes.SIZES), "position": scenes.POSITIONS}


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 32, 32, 3] -> float32 [N, 3072]."""
    return (images.astype(np.float32) / 127.5 - 1.0).reshape(len(images), -1)


def load(path: Path = WEIGHTS) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k].astype(np.float32) for k in f.files}


def features(images: np.ndarray, w: dict) -> np.ndarray:
    """float32 [N, 128]."""
    h = np.maximum(preprocess(images) @ w["w1"].T + w["b1"], 0)
    return np.maximum(h @ w["w2"].T + w["b2"], 0)


def predict(images: np.ndarray, w: dict) -> dict[str, list[str]]:
    """The classifier's own reading of each image, per head (checks the features are meaningful)."""
    logits = features(images, w) @ w["w3"].T + w["b3"]
    out, start = {}, 0
    for head, names in HEADS.items():
        out[head] = [names[i] for i in logits[:, start:start + len(names)].argmax(1)]
        start += len(names)
    return out


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||μ1 - μ2||² + tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½); tr((Σ1 Σ2)^½) = Σ √λ_i(Σ1 Σ2) (real, ≥ 0 in exact
    arithmetic; rounding noise clipped)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    eig = np.linalg.eigvals(s1.astype(np.float64) @ s2.astype(np.float64))
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
