"""Where each torch Linear/Conv weight lives in an exported ONNX graph, for LoRA at run time.

The TorchScript exporter renames and reshapes weights: a Linear run as MatMul becomes a
constant-folded, transposed initializer (`onnx::MatMul_1504` = Wᵀ), one run as Gemm keeps its
name and layout, a Conv keeps both. The map is found by value: every Linear/Conv weight of the
traced module, as traced (FP16 for FP16 exports) and transposed, is hashed and looked up among the
graph's initializers; when identical values occur more than once, the consuming node's scope
(`/m/down_blocks.0/.../to_q/MatMul`) decides. The result, stored in the manifest per graph:

    {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
        {"initializer": "onnx::MatMul_1504", "transpose": true, "dtype": "float16", "shape": [320, 320],
         "file": "unet.onnx.data", "offset": 123456, "length": 204800}, ...}

`file`/`offset`/`length` let the runtime read the base weight with a memory map (no onnx package).
An initializer that two weights resolve to (the exporter merges identical values) is marked
"shared": a LoRA on it is refused.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np


def weight_modules(module) -> dict:
    """{module path: weight array (float32)} of every Linear and Conv of a torch module."""
    import torch
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
    return {name: m.weight.detach().float().cpu().numpy()
            for name, m in module.named_modules() if isinstance(m, kinds) and m.weight is not None}


def _key(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a)
    return tuple(a.shape), a.dtype.str, hashlib.sha256(a.tobytes()).hexdigest()


def initializer_table(path: Path, wanted_shapes: set) -> tuple[dict, dict]:
    """({value key: [initializer names]}, {initializer name: record}) for the initializers of
    `path` whose shape is one of `wanted_shapes` (values read from their external data)."""
    import onnx
    from onnx import numpy_helper
    proto = onnx.load(str(path), load_external_data=False)
    by_value, records = defaultdict(list), {}
    for t in proto.graph.initializer:
        shape = tuple(t.dims)
        if shape not in wanted_shapes:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        ext = {e.key: e.value for e in t.external_data}
        if ext:
            offset, length = int(ext.get("offset", 0)), int(ext["length"])
            a = np.fromfile(Path(path).parent / ext["location"], dtype, count=length // dtype.itemsize,
                            offset=offset).reshape(shape)
            records[t.name] = {"dtype": dtype.name, "shape": list(shape), "file": ext["location"],
                               "offset": offset, "length": length}
        else:
            a = numpy_helper.to_array(t)
            records[t.name] = {"dtype": dtype.name, "shape": list(shape), "file": None}
        by_value[_key(a)].append(t.name)
    return by_value, records


def consumers(path: Path) -> dict:
    """{initializer name: [names of the nodes that read it]}."""
    import onnx
    proto = onnx.load(str(path), load_external_data=False)
    out = defaultdict(list)
    for n in proto.graph.node:
        for i in n.input:
            out[i].append(n.name)
    return out


def _in_scope(node_names: list, module_path: str, prefix: str) -> bool:
    scope = ("/" + prefix.rstrip(".") + "/" + module_path).replace(".", "/") + "/"
    return any(n.replace(".", "/").startswith(scope) for n in node_names)


def record(module, onnx_path: Path, precision: str, prefix: str = "m.") -> tuple[dict, list]:
    """(targets, missing): the map described above for `module` (the traced wrapper; its
    weights sit under `prefix`) and the module paths whose weight was not found in the graph."""
    dtype = np.float16 if precision == "fp16" else np.float32
    weights = {name[len(prefix):]: w.astype(dtype) for name, w in weight_modules(module).items()
               if name.startswith(prefix)}
    shapes = {w.shape for w in weights.values()} | {w.T.shape for w in weights.values() if w.ndim == 2}
    by_value, records = initializer_table(onnx_path, shapes)
    readers = consumers(onnx_path)
    targets, missing, users = {}, [], defaultdict(list)
    for path, w in sorted(weights.items()):
        found = None
        for transpose, a in ((False, w), (True, w.T)) if w.ndim == 2 else ((False, w),):
            names = by_value.get(_key(a), [])
            if len(names) > 1:  # identical values elsewhere: the reading node's scope decides
                names = [n for n in names if _in_scope(readers[n], path, prefix)] or names[:1]
            if names:
                found = (names[0], transpose)
                break
        if found is None or records[found[0]]["file"] is None:
            missing.append(path)
            continue
        name, transpose = found
        targets[path] = {"initializer": name, "transpose": transpose, **records[name]}
        users[name].append(path)
    for name, paths in users.items():
        if len(paths) > 1:
            for p in paths:
                targets[p]["shared"] = True
    return targets, missing
