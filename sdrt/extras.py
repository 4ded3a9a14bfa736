"""Which pip extra installs which module, so that a command run without it says so in one line.

The runtime-only install (`pip install 'sdrt[onnxruntime]'`) has numpy, tokenizers, pillow and
ONNX Runtime; everything else comes with an extra (pyproject.toml's optional-dependencies)."""
from __future__ import annotations

import importlib

from sdrt.errors import UserError

# top-level import name -> the extra that installs it
MODULE_EXTRA = {
    "torch": "export", "diffusers": "export", "transformers": "export", "onnx": "export",
    "onnx_graphsurgeon": "export", "polygraphy": "export", "safetensors": "export", "accelerate": "export",
    "onnxruntime": "onnxruntime", "matplotlib": "bench", "tensorrt": "tensorrt",
    "tensorrt_rtx": "tensorrt-rtx", "cuda": "onnxruntime-gpu",
}
# onnxruntime and onnxruntime-gpu install the same package folder: uninstalling either one breaks
# the other, so the fix for a CPU-only ONNX Runtime is the GPU wheel installed last, over it
ORT_GPU_FIX = ("pip install --force-reinstall --no-deps 'onnxruntime-gpu>=1.25' (the GPU wheel last; "
               "never uninstall onnxruntime or onnxruntime-gpu: they share files)")
# what a command that needs an extra imports first (the rest follows from these)
EXTRA_MODULES = {"export": ("torch", "diffusers", "transformers", "onnx"), "bench": ("matplotlib",)}


class ExtraMissing(UserError, ImportError):
    """One line for the CLI (a UserError); an ImportError for callers that carry on without the
    extra (sdrt doctor without a WORK_DIR)."""


def missing(e: ImportError, what: str = "this command") -> ExtraMissing | None:
    """The one-line error for a module an extra installs; None for any other import failure
    (callers pass ModuleNotFoundError: a name missing from an installed module is not this)."""
    top = (getattr(e, "name", None) or "").split(".")[0]
    extra = MODULE_EXTRA.get(top)
    if extra is None:
        return None
    return ExtraMissing(f"{what} needs the {extra} extra ({top} is not installed): "
                        f"pip install 'sdrt[{extra}]'")


def require_all(extras: list[str], what: str) -> None:
    """require() for several extras at once: one line naming every missing one."""
    lacking = []
    for extra in extras:
        try:
            require(extra, what)
        except ExtraMissing:
            lacking.append(extra)
    if lacking:
        raise ExtraMissing(f"{what} needs the {' and '.join(lacking)} extra{'s' if len(lacking) > 1 else ''}: "
                           f"pip install 'sdrt[{','.join(lacking)}]'")


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Import the extra's modules (or those of `modules` it installs) now, so that a missing one
    is one line before any work."""
    for name in modules or EXTRA_MODULES[extra]:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise missing(e, what) or ExtraMissing(f"{what} needs the {extra} extra ({e}): "
                                                   f"pip install 'sdrt[{extra}]'") from None
