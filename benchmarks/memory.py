"""`sdrt memory WORK_DIR [WORK_DIR ...]`: what a generation needs in GPU memory, and whether it fits
a Jetson (Orin's CPU and GPU share one DRAM), derived from the export, without a GPU.

Per runtime model (text encoder, denoise step, VAE encoder when exported, VAE decoder) at a given
size and batch (the VAE encoder at batch 1: the runtime encodes one input image per call):
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
  io           the buffers the runtime binds once per plan (latents and step index ping-pong,
               ids, embeddings, step table, image), each counted once as `make_plan` shares them.
With a VAE batch N (`--vae-batch N`, as `sdrt generate --vae-batch N` decodes), the VAE decoder's
activations are those of N images, not of the whole batch (sdrt.engine.vae_slices).
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
from sdrt.contract import Dims, Model, check_size, engine_tasks, models_of_tasks
from sdrt.errors import UserError
from sdrt.export.to_onnx import onnx_graph


def runtime_models(man: dict) -> tuple[str, ...]:
    """What generations with guidance run, as `sdrt build` builds them by default: the step of the
    export's UNet (an inpainting UNet's own step), and the VAE encoder of image inputs when the
    export has one (sdrt.contract.engine_tasks); in an export with ControlNets, the steps that run
    them (`sdrt build --control`), so their weights are counted."""
    cfg = mf.config(man)
    return models_of_tasks(cfg, engine_tasks(cfg, image_inputs="vae_encoder" in man["models"]), True,
                           control=cfg.controlnets > 0)


# Nominal DRAM shared by CPU and GPU (NVIDIA's module specifications).
JETSONS = {"Jetson Orin Nano 8GB": 8 << 30, "Jetson AGX Orin 32GB": 32 << 30, "Jetson AGX Orin 64GB": 64 << 30}
MB = 2 ** 20


def _itemsize(elem_type: int) -> int:
    from onnx import helper
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize


def graph_for_shapes(graph, model: Model, dims: Dims):
    """A copy of `graph` (loaded without weight data), inputs fixed to `dims`, ready for shape
    inference. Weights become graph inputs of their own shape (shape inference needs no values for
    them), and each ONNX Attention node becomes Identity(query): its output has the query's shape
    (sdrt's exporter writes it so) and ORT's symbolic inference mistakes it for com.microsoft's."""
    import onnx
    from onnx import helper
    proto = onnx.ModelProto()
    proto.CopyFrom(graph)
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


def activation_peak(graph, sizes: dict[str, int]) -> tuple[int, int]:
    """(peak bytes of intermediates alive at once in node order, tensors of unknown size).

    `graph` is the export's own graph (not the shape-inference copy, whose Attention nodes lost
    their K and V inputs): a tensor lives from its node to its last reader; one nobody reads
    dies with its node. Inputs, outputs and weights are not activations."""
    boundary = ({v.name for v in graph.graph.input} | {v.name for v in graph.graph.output}
                | {t.name for t in graph.graph.initializer})
    last_use = {}
    for k, node in enumerate(graph.graph.node):
        for name in node.input:
            last_use[name] = k
    live = peak = unknown = 0
    for k, node in enumerate(graph.graph.node):
        made = [n for n in node.output if n and n not in boundary]
        unknown += sum(n not in sizes for n in made)
        live += sum(sizes.get(n, 0) for n in made)
        peak = max(peak, live)
        dead = {n for n in node.input if last_use.get(n) == k} | {n for n in made if n not in last_use}
        live -= sum(sizes.get(n, 0) for n in dead if n not in boundary)
    return peak, unknown


def io_bytes(models: list[Model], dims: Dims) -> int:
    """The plan's bound buffers: one per tensor name across the models (make_plan shares
    `latents` between the step and the VAE, `text_embeddings` between text encoder and step)."""
    tensors = {t.name: (m.shapes(dims)[t.name], t.dtype) for m in models for t in m.tensors}
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in tensors.values())


ENGINE_BACKENDS = ("tensorrt", "tensorrt-rtx")


def engine_backend(man: dict, backend: str = "auto") -> str:
    """Whose built engine sizes count as weights: auto takes the backend with engines in the
    manifest (TensorRT first when both are built), so built RTX engines are never ignored."""
    if backend != "auto":
        return backend
    built = [b for b in ENGINE_BACKENDS if man.get("engines", {}).get(b)]
    return built[0] if built else ENGINE_BACKENDS[0]


def estimate(work_dir: Path, height: int, width: int, batch: int, backend: str = "auto",
             vae_batch: int | None = None) -> dict:
    """{model: {weights_bytes, weights_from, activation_bytes, io_bytes, unknown_tensors}} + totals.
    vae_batch: the VAE decodes this many images at a time (None: the whole batch)."""
    work_dir = Path(work_dir)
    man = mf.load(work_dir)
    cfg, contracts = mf.config(man), mf.models(man)
    check_size(height, width, cfg.size_multiple)
    if batch <= 0:
        raise UserError(f"batch {batch} must be positive")
    if vae_batch is not None and vae_batch <= 0:
        raise UserError(f"vae batch {vae_batch} must be positive")
    dims = Dims(batch=batch, height=height, width=width, cfg=cfg.can_guide, vae_factor=cfg.vae_factor,
                text_len=cfg.text_len)   # a one-chunk prompt (77 tokens)
    vae_n = min(vae_batch or batch, batch)
    names = runtime_models(man)
    model_dims = {name: dims for name in names}
    model_dims["vae_decoder"] = Dims(vae_n, height, width, True, cfg.vae_factor)
    model_dims["vae_encoder"] = Dims(1, height, width, True, cfg.vae_factor)   # one image per call
    backend = engine_backend(man, backend)
    engines = man.get("engines", {}).get(backend, {})
    out = {}
    for name in names:
        files = mf.model_files(work_dir, man, name)          # one line if a file is missing
        graph = onnx_graph(files[0])
        peak, unknown = activation_peak(graph, tensor_bytes(graph_for_shapes(graph, contracts[name], model_dims[name])))
        engine = engines.get(name)
        out[name] = {"weights_bytes": engine["size_bytes"] if engine else sum(f.stat().st_size for f in files),
                     "weights_from": f"{backend} engine" if engine else "onnx",
                     "activation_bytes": peak, "unknown_tensors": unknown}
    weights = sum(m["weights_bytes"] for m in out.values())
    act = max(m["activation_bytes"] for m in out.values())
    io = io_bytes([contracts[n] for n in names if n != "vae_encoder"], dims)
    if "vae_encoder" in names:  # its own buffers
        io += io_bytes([contracts["vae_encoder"]], model_dims["vae_encoder"])
    step = next(n for n in names if contracts[n].step)
    return {"export": work_dir.name, "precision": mf.precision_label(man), "attention": man.get("attention", "decomposed"),
            "height": height, "width": width, "batch": batch, "vae_batch": vae_n, "step": step, "models": out,
            "weights_bytes": weights, "activation_bytes": act, "io_bytes": io, "total_bytes": weights + act + io}


def table(estimates: list[dict]) -> str:
    from sdrt.benchmarks.report import export_label
    devices = list(JETSONS)
    head = ["export", "size", "batch", "weights MB", "text enc act MB", "step act MB", "vae batch", "vae act MB",
            "vae enc act MB", "io MB", "total MB"] + [f"left on {d} MB" for d in devices]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in estimates:
        m = e["models"]
        row = [export_label(e), f"{e['height']}x{e['width']}", str(e["batch"]),
               f"{e['weights_bytes'] / MB:.0f}", f"{m['text_encoder']['activation_bytes'] / MB:.0f}" if "text_encoder" in m else "-",
               f"{m[e['step']]['activation_bytes'] / MB:.0f}", str(e.get("vae_batch", e["batch"])),
               f"{m['vae_decoder']['activation_bytes'] / MB:.0f}",
               f"{m['vae_encoder']['activation_bytes'] / MB:.0f}" if "vae_encoder" in m else "-",
               f"{e['io_bytes'] / MB:.0f}", f"{e['total_bytes'] / MB:.0f}"]
        row += [f"{(JETSONS[d] - e['total_bytes']) / MB:.0f}" for d in devices]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("\nAn estimate from the export's graphs (sdrt.benchmarks.memory), not a measurement. total = "
                 "weights + the largest activation block (shared by the engines) + io; vae batch = images per "
                 "VAE run (`--vae-batch`); left = the device's "
                 "nominal memory - total, which must still hold the OS, the CUDA context and the application.")
    return "\n".join(lines)


def main(work_dirs: list, sizes: str = "512x512", batches: str = "1,4", backend: str = "auto",
         out=None, vae_batch: int | None = None) -> None:
    """Estimate every (export, size, batch) and print the table; with `out` (.md) also write it
    and the figures (.json beside it)."""
    from sdrt.benchmarks.bench import parse_ints, parse_sizes
    from sdrt.fileio import write_atomic, write_json_atomic
    size_list, batch_list = parse_sizes(sizes), parse_ints(batches, "batches")
    if vae_batch is not None and vae_batch <= 0:
        raise UserError(f"--vae-batch {vae_batch}: give a positive number of images")
    if out is not None and Path(out).suffix != ".md":
        raise UserError(f"--out {out}: give a .md path (a .json with the figures is written beside it)")
    for work_dir in work_dirs:       # every mistake before any work
        man = mf.load(work_dir)
        for h, w in size_list:
            check_size(h, w, mf.config(man).size_multiple)
        for name in runtime_models(man):
            mf.model_files(work_dir, man, name)
    estimates = []
    for work_dir in work_dirs:
        for h, w in size_list:
            for b in batch_list:
                print(f"{Path(work_dir).name}: {h}x{w} batch {b} ...", file=sys.stderr, flush=True)
                estimates.append(estimate(work_dir, h, w, b, backend, vae_batch))
    if any(m["unknown_tensors"] for e in estimates for m in e["models"].values()):
        print("warning: some tensors had no static shape; their bytes are not counted", file=sys.stderr)
    text = table(estimates)
    print(text)
    if out is not None:
        out = Path(out)
        write_json_atomic(out.with_suffix(".json"), {"estimates": estimates, "devices_bytes": JETSONS})
        write_atomic(out, (text + "\n").encode())
        print(f"wrote {out}")
