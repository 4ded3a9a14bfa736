"""`sdrt memory WORK_DIR [WORK_DIR ...]`: what a generation needs in GPU memory, and whether it fits
a Jetson (Orin's CPU and GPU share one DRAM), derived from the export, without a GPU.

Per runtime model (text encoder, denoise step, VAE decoder) at a given size and batch:
  weights      the built engine's size when there is one for --backend, else the ONNX weights;
  activations  the peak of the intermediate tensors alive at once when the graph runs node by
               node in its exported order, each freed after its last reader (shapes from ONNX
               Runtime's symbolic shape inference at the exact size). An estimate, not a
               measurement: it ignores in-place reuse and fusion (TensorRT needs less: it fuses
               elementwise chains and plans its own memory; the figure TensorRT itself reports,
               device_memory_size_v2, is recorded by the runtime when engines are loaded on a GPU).
               A fused Attention op counts as its output alone, so comparing an `--attention op`
               export with a `decomposed` one shows what the fused kernel keeps out of memory (the
               [B·heads, tokens, tokens] score matrices);
  io           the contract's bound buffers (latents ping-pong, embeddings, image, step table).
The total is weights of all three + the largest activation block (sdrt's TensorRT path gives the
three engines one shared activation block, since they never run at once) + io. What is left of the
device's memory must hold the OS, the CUDA context and the application: measure that part on the
device (tegrastats); it is not estimated here.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sdrt import manifest as mf
from sdrt.contract import Dims, Model, check_size
from sdrt.errors import UserError

MODELS = ("text_encoder", "denoise_step_cfg", "vae_decoder")
# Nominal DRAM shared by CPU and GPU (NVIDIA's module specifications).
JETSONS = {"Jetson Orin Nano 8GB": 8 << 30, "Jetson AGX Orin 32GB": 32 << 30, "Jetson AGX Orin 64GB": 64 << 30}
MB = 2 ** 20


def _itemsize(elem_type: int) -> int:
    from onnx import helper
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize


def graph_for_shapes(path: Path, model: Model, dims: Dims):
    """The graph without weight data, inputs fixed to `dims`, ready for shape inference.

    Weights become graph inputs of their own shape (shape inference needs no values for them),
    and each ONNX Attention node becomes Identity(query): its output has the query's shape
    (sdrt's exporter writes it so) and ORT's symbolic inference mistakes it for com.microsoft's."""
    import onnx
    from onnx import helper
    proto = onnx.load(str(path), load_external_data=False)
    del proto.graph.value_info[:]
    small = []
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) > 4096:
            proto.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            small.append(t)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(small)
    shapes = model.shapes(dims)
    for v in list(proto.graph.input) + list(proto.graph.output):
        if v.name in shapes:
            for d, n in zip(v.type.tensor_type.shape.dim, shapes[v.name]):
                d.Clear()
                d.dim_value = n
    for node in proto.graph.node:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            node.op_type = "Identity"
            del node.input[1:]
            del node.attribute[:]
    return proto


def tensor_bytes(proto) -> dict[str, int]:
    """Bytes of every intermediate tensor whose shape inference found a static shape."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    out = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if t.HasField("shape") and None not in dims:
            out[v.name] = int(np.prod(dims, dtype=np.int64)) * _itemsize(t.elem_type)
    return out


def activation_peak(proto, sizes: dict[str, int]) -> tuple[int, int]:
    """(peak bytes of intermediates alive at once in node order, tensors of unknown size)."""
    boundary = {v.name for v in proto.graph.input} | {v.name for v in proto.graph.output}
    last_use = {}
    for k, node in enumerate(proto.graph.node):
        for name in node.input:
            last_use[name] = k
    live = peak = unknown = 0
    for k, node in enumerate(proto.graph.node):
        for name in node.output:
            if name and name not in boundary:
                unknown += name not in sizes
                live += sizes.get(name, 0)
        peak = max(peak, live)
        for name in set(node.input):
            if last_use.get(name) == k and name in sizes and name not in boundary:
                live -= sizes[name]
    return peak, unknown


def io_bytes(model: Model, dims: Dims) -> int:
    shapes = model.shapes(dims)
    return sum(int(np.prod(shapes[t.name])) * np.dtype(t.dtype).itemsize for t in model.tensors)


def estimate(work_dir: Path, height: int, width: int, batch: int, backend: str = "tensorrt") -> dict:
    """{model: {weights_bytes, weights_from, activation_bytes, io_bytes, unknown_tensors}} + totals."""
    work_dir = Path(work_dir)
    man = mf.load(work_dir)
    cfg, contracts = mf.config(man), mf.models(man)
    check_size(height, width, cfg.vae_factor)
    if batch <= 0:
        raise UserError(f"batch {batch} must be positive")
    dims = Dims(batch=batch, height=height, width=width, cfg=True, vae_factor=cfg.vae_factor)
    engines = man.get("engines", {}).get(backend, {})
    out = {}
    for name in MODELS:
        model = contracts[name]
        proto = graph_for_shapes(work_dir / "onnx" / model.onnx, model, dims)
        peak, unknown = activation_peak(proto, tensor_bytes(proto))
        engine = engines.get(name)
        onnx_bytes = sum(f.stat().st_size for f in mf.model_files(work_dir, man, name))
        out[name] = {"weights_bytes": engine["size_bytes"] if engine else onnx_bytes,
                     "weights_from": f"{backend} engine" if engine else "onnx",
                     "activation_bytes": peak, "io_bytes": io_bytes(model, dims), "unknown_tensors": unknown}
    weights = sum(m["weights_bytes"] for m in out.values())
    act = max(m["activation_bytes"] for m in out.values())
    io = sum(m["io_bytes"] for m in out.values())
    return {"export": work_dir.name, "precision": man["precision"], "attention": man.get("attention", "decomposed"),
            "height": height, "width": width, "batch": batch, "models": out,
            "weights_bytes": weights, "activation_bytes": act, "io_bytes": io, "total_bytes": weights + act + io}


def table(estimates: list[dict]) -> str:
    devices = list(JETSONS)
    head = ["export", "size", "batch", "weights MB", "text enc act MB", "step act MB", "vae act MB",
            "io MB", "total MB"] + [f"left on {d} MB" for d in devices]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in estimates:
        m = e["models"]
        row = [f"{e['precision']}, attention {e['attention']}", f"{e['height']}x{e['width']}", str(e["batch"]),
               f"{e['weights_bytes'] / MB:.0f}", f"{m['text_encoder']['activation_bytes'] / MB:.0f}",
               f"{m['denoise_step_cfg']['activation_bytes'] / MB:.0f}", f"{m['vae_decoder']['activation_bytes'] / MB:.0f}",
               f"{e['io_bytes'] / MB:.0f}", f"{e['total_bytes'] / MB:.0f}"]
        row += [f"{(JETSONS[d] - e['total_bytes']) / MB:.0f}" for d in devices]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("\nAn estimate from the export's graphs (sdrt.benchmarks.memory), not a measurement. total = "
                 "weights + the largest activation block (shared by the engines) + io; left = the device's "
                 "nominal memory - total, which must still hold the OS, the CUDA context and the application.")
    return "\n".join(lines)


def main(a) -> None:
    from sdrt.benchmarks.bench import parse_ints, parse_sizes
    from sdrt.fileio import write_atomic, write_json_atomic
    sizes, batches = parse_sizes(a.sizes), parse_ints(a.batches, "batches")
    if a.out is not None and Path(a.out).suffix != ".md":
        raise UserError(f"--out {a.out}: give a .md path (a .json with the figures is written beside it)")
    for work_dir in a.work_dirs:       # every mistake before any work
        for h, w in sizes:
            check_size(h, w, mf.config(mf.load(work_dir)).vae_factor)
    estimates = []
    for work_dir in a.work_dirs:
        for h, w in sizes:
            for b in batches:
                print(f"{Path(work_dir).name}: {h}x{w} batch {b} ...", file=sys.stderr, flush=True)
                estimates.append(estimate(work_dir, h, w, b, a.backend))
    if any(m["unknown_tensors"] for e in estimates for m in e["models"].values()):
        print("warning: some tensors had no static shape; their bytes are not counted", file=sys.stderr)
    text = table(estimates)
    print(text)
    if a.out is not None:
        out = Path(a.out)
        write_json_atomic(out.with_suffix(".json"), {"estimates": estimates, "devices_bytes": JETSONS})
        write_atomic(out, (text + "\n").encode())
        print(f"wrote {out}")
