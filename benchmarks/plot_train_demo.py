"""Plot a demo model's UNet training loss from its train_demo.json (matplotlib, the bench extra).

    python -m sdrt.benchmarks.plot_train_demo       (sdrt/demo_model -> benchmarks/results/demo-train-loss.png)
"""
from __future__ import annotations

import json
from pathlib import Path

from sdrt.demo import DEMO_MODEL
from sdrt.fileio import atomic_path


def plot(model_dir: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rec = json.loads((model_dir / "train_demo.json").read_text())
    loss = rec["unet_loss_mean_per_10_steps"]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot([10 * i + 5 for i in range(len(loss))], loss, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    pred = rec["settings"].get("prediction", "epsilon")   # older records: the ε loss
    ax.set_ylabel(("Min-SNR-5 weighted ε loss" if pred == "epsilon" else "(min(SNR,5)+1)-weighted v loss")
                  + " (mean of 10 steps)", fontsize=8)
    ax.set_title(f"sdrt train-demo --steps {rec['steps']} --seed {rec['seed']} "
                 f"({rec['wall_seconds_since_start'] / 60:.0f} min wall)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out, ".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(model_dir: Path = DEMO_MODEL, out: Path = Path("benchmarks/results/demo-train-loss.png")) -> None:
    plot(model_dir, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
