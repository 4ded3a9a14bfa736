"""`sdrt demo`: the embedded default, end to end on CPU in a few minutes.

init tiny (random weights) -> export FP32 -> generate on ONNX Runtime CPU -> PNG + timing table.
Steps already done (a folder from an earlier run) are reused.
"""
from __future__ import annotations

import sys

from sdrt import manifest as mf


def main(a) -> None:
    from sdrt.engine.generate import save_images, timing_table
    from sdrt.engine.pipeline import Pipeline
    model_dir, work_dir, out = a.dir / "tiny", a.dir / "tiny-fp32", a.dir / "demo.png"
    if not (model_dir / "model_index.json").is_file():
        from sdrt.export.init_models import init
        print(f"[demo] sdrt init {model_dir} --arch tiny", file=sys.stderr)
        init(model_dir, "tiny", force=model_dir.exists())
    if not (work_dir / mf.NAME).is_file():
        from sdrt.export.export import export
        print(f"[demo] sdrt export {model_dir} {work_dir} --precision fp32", file=sys.stderr)
        export(model_dir, work_dir, precision="fp32")
    print(f"[demo] sdrt generate {work_dir} {a.prompt!r} --seed 0 --height 128 --width 128",
          file=sys.stderr)
    pipe = Pipeline(work_dir, backend="onnxruntime-cpu")
    result = pipe.generate(a.prompt, seed=0, height=128, width=128)
    save_images(result.pil(), [out])
    print(f"wrote {out}")
    print(timing_table(result.timings))
