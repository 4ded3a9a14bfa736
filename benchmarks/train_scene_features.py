"""Train the FID feature classifier of benchmarks/scene_features.py once (torch; about a minute on
2 CPU cores) and write benchmarks/scene_features.npz (FP16 weights).

    python -m sdrt.benchmarks.train_scene_features      (2000 steps, seed 0)

It learns every scene of the domain (held-out combinations included: it is the ruler, not the
model), with Gaussian pixel noise and random blur, so that generated images with soft edges or
small colour errors land near their scene rather than off the feature manifold.
"""
from __future__ import annotations

import sys

import numpy as np

from sdrt import scenes
from sdrt.benchmarks.scene_features import HEADS, WEIGHTS, preprocess
from sdrt.fileio import atomic_path


def labels(scene_list) -> np.ndarray:
    """int64 [N, 5]: the index of each scene's value per head."""
    return np.array([[names.index(getattr(s, head)) for head, names in HEADS.items()] for s in scene_list])


def augment(x, g):
    """Pixel noise (σ up to 0.15) and a random 3x3 box blur on half the batch, on [N, 3, 32, 32]."""
    import torch
    import torch.nn.functional as F
    blur = torch.rand(len(x), generator=g) < 0.5
    soft = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where(blur[:, None, None, None], soft, x)
    sigma = 0.15 * torch.rand(len(x), 1, 1, 1, generator=g)
    return x + sigma * torch.randn(x.shape, generator=g)


def train(steps: int, seed: int) -> dict[str, np.ndarray]:
    import torch
    from torch import nn
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    scene_list = scenes.all_scenes()
    images = np.stack([scenes.render(s) for s in scene_list])
    x_all = torch.from_numpy(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    y_all = torch.from_numpy(labels(scene_list))
    sizes = [len(v) for v in HEADS.values()]
    net = nn.Sequential(nn.Linear(3072, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, sum(sizes)))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (128,), generator=g)
        x = augment(x_all[idx], g).permute(0, 2, 3, 1)
        x = torch.from_numpy(preprocess(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()))
        logits = net(x).split(sizes, dim=1)
        loss = sum(nn.functional.cross_entropy(lg, y_all[idx, i]) for i, lg in enumerate(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"\rstep {step + 1}/{steps} loss {loss.item():.4f}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    layers = [m for m in net if isinstance(m, nn.Linear)]
    return {f"{k}{i + 1}": getattr(m, "weight" if k == "w" else "bias").detach().numpy().astype(np.float16)
            for i, m in enumerate(layers) for k in ("w", "b")}


def main(steps: int = 2000, seed: int = 0) -> None:
    weights = train(steps, seed)
    with atomic_path(WEIGHTS, ".npz") as tmp:
        np.savez(tmp, **weights)
    print(f"wrote {WEIGHTS}")


if __name__ == "__main__":
    main()
