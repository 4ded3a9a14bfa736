"""Run `sdrt ARGS...` as the runtime-only install (`pip install 'sdrt[onnxruntime]'`) would: every
module that only an extra installs is made unimportable by a sys.meta_path finder.

    python tests/runtime_only.py generate WORK_DIR "a fox" --out fox.png
"""
import importlib.abc
import sys

# what `pip install 'sdrt[onnxruntime]'` does not install (pyproject.toml's other extras)
BLOCKED = {"torch", "diffusers", "transformers", "onnx", "onnx_graphsurgeon", "polygraphy", "safetensors",
           "accelerate", "matplotlib", "peft", "tensorrt", "tensorrt_rtx", "cuda"}


class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return None


if __name__ == "__main__":
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, Blocked())
    from sdrt.cli import main
    sys.exit(main(sys.argv[1:]))
