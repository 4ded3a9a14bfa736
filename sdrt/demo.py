"""`sdrt demo`: the embedded default, end to end on CPU in a few minutes.

init tiny (random weights) -> export FP32 -> generate on ONNX Runtime CPU -> PNG + timing table.
Steps already done (a folder from an earlier run) are reused.
"""
from __future__ import annotations

import sys
from pathlib import Path

from sdrt import manifest as mf


def demo_export(root: Path = Path("sdrt-demo")) -> Path:
    """The demo model's export under `root`, made first if missing; returns its WORK_DIR."""
    model_dir, work_dir = root / "tiny", root / "tiny-fp32"
    if not (model_dir / "model_index.json").is_file():
        from sdrt.export.init_models import init
        print(f"[demo] sdrt init {model_dir} --arch tiny", file=sys.stderr)
        init(model_dir, "tiny", force=model_dir.exists())
    if not (work_dir / mf.NAME).is_file():
        from sdrt.export.export import export
        print(f"[demo] sdrt export {model_dir} {work_dir} --precision fp32", file=sys.stderr)
        export(model_dir, work_dir, precision="fp32")
    return work_dir


def main(root: Path, prompt: str) -> None:
    """Export the demo model if needed, generate one 128x128 image on ONNX Runtime CPU."""
    from sdrt.engine.pipeline import Pipeline
    from sdrt.engine.timing import timing_table
    from sdrt.fileio import save_images
    work_dir, out = demo_export(root), root / "demo.png"
    print(f"[demo] sdrt generate {work_dir} {prompt!r} --seed 0 --height 128 --width 128",
          file=sys.stderr)
    pipe = Pipeline(work_dir, backend="onnxruntime-cpu")
    result = pipe.generate(prompt, seed=0, height=128, width=128)
    save_images(result.pil(), [out])
    print(f"wrote {out}")
    print(timing_table(result.timings))
