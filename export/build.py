"""ONNX -> TensorRT / TensorRT-RTX engines (FP16 from the graph's own dtypes: strongly typed).

    build(work_dir, "tensorrt-rtx")          static profile at the export's native size, batch 1
    build(..., dynamic="batch=1:1:4,height=256:512:768,width=256:512:768")     min:opt:max ranges

Writes WORK_DIR/engines/<backend>/<model>.plan (atomically) and records each engine in
manifest["engines"][backend][model] with the key it was built for: ONNX hash, backend, version,
GPU, profile and options (sdrt.engine.engine_keys: keys, and `check_engine`, which the runtime uses
to refuse a plan whose key no longer holds); `build` skips models whose key still holds.

One model at a time, builder/network/parser freed between models, optional workspace limit:
sized for a Jetson as much as for a workstation.
"""
from __future__ import annotations

import gc
import sys
import threading
import time
from pathlib import Path

from sdrt import manifest as mf
from sdrt.contract import STEP_TABLE_ROWS, Dims, Model, Step, check_size, engine_tasks, models_of_tasks
from sdrt.engine import cuda
from sdrt.engine.engine_keys import (MODULES, current_hash, engine_key, first_change, import_trt, io_digest,
                              major_minor, onnx_stat)
from sdrt.errors import UserError
from sdrt.export import attention
from sdrt.fileio import write_atomic, write_json_atomic

DIMS = ("batch", "height", "width")  # what --dynamic may range over


# ---- profiles -------------------------------------------------------------------------------------

def parse_dynamic(spec: str | None, batch: int, height: int, width: int, vae_factor: int) -> dict:
    """{"min"|"opt"|"max": {"batch", "height", "width"}} from "batch=1:2:4,height=256:512:768".

    Dims the spec leaves out stay at the static values; "batch=2" alone means 2:2:2."""
    ranges = {d: (v, v, v) for d, v in zip(DIMS, (batch, height, width))}
    seen = set()
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or name not in DIMS:
            raise UserError(f"bad --dynamic item {item.strip()!r}: use name=min:opt:max with "
                            f"name one of {', '.join(DIMS)}, e.g. batch=1:2:4,height=256:512:768")
        if name in seen:
            raise UserError(f"--dynamic gives {name} twice")
        seen.add(name)
        parts = value.split(":")
        try:
            nums = tuple(int(p) for p in parts)
        except ValueError:
            nums = ()
        if len(nums) == 1:
            nums = nums * 3
        if len(nums) != 3:
            raise UserError(f"bad --dynamic range {item.strip()!r}: give min:opt:max as integers")
        if not 0 < nums[0] <= nums[1] <= nums[2]:
            raise UserError(f"bad --dynamic range {item.strip()!r}: need 0 < min <= opt <= max")
        ranges[name] = nums
    for i in range(3):
        if ranges["batch"][i] <= 0:
            raise UserError(f"batch {ranges['batch'][i]} must be positive")
        check_size(ranges["height"][i], ranges["width"][i], vae_factor)
    return {k: {d: ranges[d][i] for d in DIMS} for i, k in enumerate(("min", "opt", "max"))}


# rows of the step graph's noise buffer: 1 (deterministic samplers) up to a full table (a stochastic
# sampler's steps; step-level batching over the whole table)
NOISE_STEPS = {"min": 1, "opt": 50, "max": STEP_TABLE_ROWS}


def profile_for(model: Model, ranges: dict, guidance: bool, vae_factor: int, max_chunks: int = 1,
                text_len: int = 77) -> dict:
    """{input: {"min": [...], "opt": [...], "max": [...]}} via the contract's own dims; prompts
    of 1 chunk (min, opt) to max_chunks chunks of text_len tokens (max). The VAE encoder runs at
    batch 1 (one input image per call, its latents repeated over the batch)."""
    one = {"batch": 1} if model.name == "vae_encoder" else {}
    chunks = {"min": 1, "opt": 1, "max": max_chunks}
    shapes = {k: model.shapes(Dims(**{**ranges[k], **one}, cfg=guidance, vae_factor=vae_factor,
                                   chunks=chunks[k], text_len=text_len, noise_steps=NOISE_STEPS[k]))
              for k in ("min", "opt", "max")}
    return {t.name: {k: list(shapes[k][t.name]) for k in ("min", "opt", "max")} for t in model.inputs}


def model_options(model: Model, options: dict, max_prompt_chunks: int) -> dict:
    """The options one engine is keyed by: models that take text record the prompt-chunk limit."""
    takes_text = any(d in ("text_rows", "text_seq") for t in model.inputs for d in t.shape)
    return {**options, "max_prompt_chunks": max_prompt_chunks} if takes_text else options


# ---- the builder's differences between TensorRT 10, TensorRT 11 and TensorRT-RTX -----------------

def builder_api(trt, backend: str) -> dict:
    major = major_minor(trt.__version__)[0]
    rtx = backend == "tensorrt-rtx"
    # TensorRT 10 infers precision unless the network is STRONGLY_TYPED (then the ONNX dtypes rule,
    # and FP16/BF16 builder flags are refused). TRT 11 and RTX are always strongly typed: the flag
    # is deprecated and ignored there, so pass none.
    flags = 0 if rtx or major >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    # RTX builds on the CPU; its timing cache is a deprecated no-op (1.2) that makes the builder
    # look for a GPU, so it is not used.
    return {"network_flags": flags, "timing_cache": not rtx,
            "opt_level": hasattr(trt.IBuilderConfig, "builder_optimization_level"),
            "progress": hasattr(trt, "IProgressMonitor"),
            # RTX (since 1.2) allows CUDA stream capture only for engines that allocate nothing
            # themselves at run time: we hand them all memory (activation block, bound outputs)
            "user_allocation": rtx and hasattr(trt.BuilderFlag, "REQUIRE_USER_ALLOCATION")}


# ---- building -------------------------------------------------------------------------------------

def _logger(trt):
    class Logger(trt.ILogger):
        """Keeps errors for the one-line failure message; prints warnings and errors."""
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg.strip())
            if severity == trt.ILogger.Severity.WARNING:  # errors go into our one-line message
                print(f"  [{trt.__name__}] {msg.strip()}", file=sys.stderr)
    return Logger()


def _progress_monitor(trt):
    class Progress(trt.IProgressMonitor):
        """Prints the builder's top two phase levels to stderr (called from builder threads)."""
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.lock, self.depth = threading.Lock(), {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self.lock:
                d = self.depth[phase_name] = self.depth.get(parent_phase, -1) + 1 if parent_phase else 0
                if d <= 1:
                    print(f"  {'  ' * d}{phase_name} ({num_steps} steps)", file=sys.stderr, flush=True)

        def step_complete(self, phase_name, step):
            return True  # keep building

        def phase_finish(self, phase_name):
            with self.lock:
                self.depth.pop(phase_name, None)
    return Progress()


def _serialize(builder, network, config):
    """builder.build_serialized_network: IHostMemory, or None when the build failed."""
    return builder.build_serialized_network(network, config)


def _check_network(network, model: Model, trt, path: Path) -> None:
    """The parsed graph's I/O must be the contract's: names, ranks, dtypes."""
    import numpy as np
    got = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        got[t.name] = (len(t.shape), np.dtype(trt.nptype(t.dtype)).name)
    for i in range(network.num_outputs):
        t = network.get_output(i)
        got[t.name] = (len(t.shape), np.dtype(trt.nptype(t.dtype)).name)
    want = {t.name: (len(t.shape), t.dtype) for t in model.tensors}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        raise UserError(f"{path} does not match the {model.name} contract (name, rank, dtype "
                        f"differ: {diff}): export again")


def check_attention_support(trt, backend: str, form: str) -> None:
    """TensorRT parses ONNX's Attention op from 10.14 on: say so before a long parse fails."""
    if form != "op" or backend != "tensorrt":
        return
    if major_minor(trt.__version__) < attention.TRT_FIRST:
        raise UserError(f"this export writes attention as ONNX's Attention op, which TensorRT parses from "
                        f"{'.'.join(map(str, attention.TRT_FIRST))} on (installed: {trt.__version__}): "
                        f"export again with --attention decomposed")


def refit_names(manifest: dict, name: str) -> list[str]:
    """ONNX initializers of model `name` that LoRA may change (the export's map; the step graphs
    use the UNet's)."""
    rec = manifest["models"][name]
    source = manifest["models"].get(rec.get("weights_of", name), {})
    return sorted({t["initializer"] for t in (source.get("lora_targets") or {}).values()})


def _make_refittable(trt, network, config, names: list[str], model_name: str) -> None:
    """Only the LoRA-mappable weights refittable (REFIT_INDIVIDUAL: the rest may still be folded);
    TensorRT names a parsed initializer's weights by the initializer, so a refit finds them by the
    names the export recorded. Without that API: every weight refittable (REFIT)."""
    if hasattr(trt.BuilderFlag, "REFIT_INDIVIDUAL") and hasattr(network, "mark_weights_refittable"):
        missing = [n for n in names if not network.mark_weights_refittable(n)]
        if missing:
            raise UserError(f"{model_name}: the parsed network has no weights named {missing[0]!r} "
                            f"({len(missing)} of {len(names)} LoRA weights): export again")
        config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
    else:
        config.set_flag(trt.BuilderFlag.REFIT)


def allow_decomposed_attention(network, trt) -> int:
    """Prompt lengths as a range (77..77K): TensorRT has no fused attention kernel for every key
    length of the cross attention (RTX 1.7 refuses the build), so each attention may fall back
    to MatMul/Softmax/MatMul where no fused kernel fits; where one fits it is still used.
    Returns how many attentions were marked."""
    marked = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == getattr(trt.LayerType, "ATTENTION_INPUT", None):
            layer = _as(trt, layer, "IAttentionInputLayer")
            layer.attention.decomposable = True
            marked += 1
    return marked


def varies_in_length(profile: dict) -> bool:
    """True when some input's profile is a range in a dimension after the first (the batch or
    row count): a latent height/width range (--dynamic height=..., width=...) or a text-length
    range. Attention over such a length has no fused kernel for every length in the range
    (TensorRT-RTX 1.7 stops with a Myelin "not supported by a dedicated kernel" otherwise, e.g.
    on the VAE's mid-block self attention)."""
    return any(p["min"][1:] != p["max"][1:] for p in profile.values())


def _as(trt, layer, cls: str):
    layer.__class__ = getattr(trt, cls)   # the bindings' way to reach a layer's own interface
    return layer


def _build_one(trt, api, backend: str, model: Model, files: list[Path], profile: dict,
               options: dict, cache_bytes: bytes | None, progress: bool, weights: list[str] = ()):
    """Parse + build one model: (plan bytes, build seconds, timing cache bytes or None)."""
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(api["network_flags"])
    parser = trt.OnnxParser(network, logger)
    config = builder.create_builder_config()
    monitor = _progress_monitor(trt) if progress and api["progress"] else None
    cache = None
    try:
        t0 = time.perf_counter()
        if not parser.parse_from_file(str(files[0])):  # resolves external data beside the file
            e = parser.get_error(0)
            where = f" at node {e.node()} {e.node_name()!r} ({e.node_operator()})" if e.node() >= 0 else ""
            fix = ("export again with --attention decomposed" if e.node() >= 0 and e.node_operator() == "Attention"
                   else "export again")
            raise UserError(f"cannot parse {files[0]}{where}: {' '.join(e.desc().split())}: {fix}")
        _check_network(network, model, trt, files[0])
        if options.get("max_prompt_chunks", 1) > 1 or varies_in_length(profile):
            allow_decomposed_attention(network, trt)
        prof = builder.create_optimization_profile()
        for name, p in profile.items():
            prof.set_shape(name, p["min"], p["opt"], p["max"])  # min/opt/max for profile 0
        if config.add_optimization_profile(prof) < 0:
            raise UserError(f"{model.name}: TensorRT refused the profile {profile}")
        if options["workspace_mb"] is not None:  # scratch memory the tactics may use
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options["workspace_mb"] << 20)
        if options["require_user_allocation"]:  # graph-capturable RTX engine
            config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
        if options["refit"]:
            _make_refittable(trt, network, config, weights, model.name)
        if options["opt_level"] is not None and api["opt_level"]:
            config.builder_optimization_level = options["opt_level"]  # 0..5, TRT default 3
        if monitor is not None:
            config.progress_monitor = monitor
        if cache_bytes is not None:  # shared timing cache: reuse kernel timings across builds
            try:
                cache = config.create_timing_cache(cache_bytes)
            except Exception:  # damaged
                cache = None
            cache = cache or config.create_timing_cache(b"")  # none usable: start afresh
            config.set_timing_cache(cache, ignore_mismatch=False)
        try:
            plan = _serialize(builder, network, config)
        except (RuntimeError, MemoryError) as e:  # bindings may raise instead of returning None
            logger.errors.append(str(e) or type(e).__name__)
            plan = None
        if plan is None:
            first = " ".join(logger.errors[0].split()) if logger.errors else "no message"
            if options["refit"] and backend == "tensorrt-rtx" and not cuda.available():
                raise UserError(f"building {model.name} failed ({first[:200]}): TensorRT-RTX "
                                f"{trt.__version__} builds refittable engines only where a CUDA GPU is "
                                f"present; build with --refit on the GPU machine, or without --refit here")
            if "Attention operation was not supported" in first:
                raise UserError(f"building {model.name} failed: {trt.__name__} {trt.__version__} has no "
                                f"attention kernel for this profile ({first[:160]}): build a static size "
                                "(--height/--width) or another --dynamic range")
            raise UserError(f"building {model.name} failed ({first}): if it ran out "
                            f"of memory, lower --workspace-mb or build a smaller --dynamic profile")
        new_cache = bytes(memoryview(cache.serialize())) if cache is not None else None
        return plan, time.perf_counter() - t0, new_cache
    finally:
        del parser, network, config, builder, cache, monitor
        gc.collect()


def build(work_dir: Path, backend: str, height: int | None = None, width: int | None = None,
          batch: int = 1, dynamic: str | None = None, opt_level: int | None = None,
          timing_cache: Path | None = None, guidance: bool = True, workspace_mb: int | None = None,
          progress: bool = True, inpaint: bool = False, max_prompt_chunks: int = 3,
          refit: bool = False, control: bool = False) -> dict:
    """Build the runtime's engines; returns {"backend", "built", "up_to_date", "engines"}.

    inpaint: with a 4-channel UNet, also the inpainting (blend) step; an export of a 9-channel
    inpainting UNet has only its inpainting step.
    max_prompt_chunks: the longest prompt the text models take, in 77-token chunks.
    refit: the engines of LoRA-mapped models (text encoder, every denoise step variant) are
    refittable in exactly the weights LoRA may change, so `generate --lora` refits instead of
    rebuilding.
    control: also the steps with the export's ControlNets (one engine each: ControlNets + UNet)."""
    work_dir = Path(work_dir)
    if backend not in MODULES:
        raise UserError(f"unknown backend {backend!r}: use one of {', '.join(MODULES)}")
    man = mf.load(work_dir)
    cfg = mf.config(man)
    contracts = mf.models(man)
    # the engines to build: text encoder, step graph(s), VAE encoder (exports that have one), decoder
    tasks = engine_tasks(cfg, inpaint, "vae_encoder" in contracts)
    names = models_of_tasks(cfg, tasks, guidance)
    if control:                 # also the steps that run the export's ControlNets
        names = models_of_tasks(cfg, tasks, guidance) + tuple(
            n for n in models_of_tasks(cfg, tasks, guidance, control=True) if n not in names)
    steps = {Step.for_task(cfg, t, guidance, control=c).name for t in tasks for c in {False, control}}
    for n in names:
        if n not in contracts:
            raise UserError(f"{work_dir} has no {n} model: export again"
                            + (f" (guidance off needs {n})" if n in steps and not guidance else ""))
    if opt_level is not None and not 0 <= opt_level <= 5:
        raise UserError(f"opt level {opt_level} must be 0..5")
    if workspace_mb is not None and workspace_mb <= 0:
        raise UserError(f"workspace {workspace_mb} MB must be positive")
    if not isinstance(max_prompt_chunks, int) or max_prompt_chunks < 1:
        raise UserError(f"--max-prompt-chunks {max_prompt_chunks} must be at least 1 (one chunk: 75 tokens)")
    ranges = parse_dynamic(dynamic, batch, height or cfg.default_height, width or cfg.default_width,
                           cfg.vae_factor)
    backend, trt = import_trt(backend)
    check_attention_support(trt, backend, man.get("attention", "decomposed"))
    api = builder_api(trt, backend)
    options = {"opt_level": opt_level, "strongly_typed": True, "workspace_mb": workspace_mb,
               "require_user_allocation": api["user_allocation"]}
    cache_bytes = loaded_cache = None
    if timing_cache is not None and api["timing_cache"]:
        timing_cache = Path(timing_cache)
        cache_bytes = loaded_cache = timing_cache.read_bytes() if timing_cache.is_file() else b""
    elif timing_cache is not None:
        print(f"timing cache {timing_cache} not used: {backend} has none", file=sys.stderr)
    if refit and not any(refit_names(man, n) for n in names):
        raise UserError(f"{work_dir} records no LoRA weight map (an export from before LoRA support): "
                        f"run `sdrt export` again to build with --refit")
    out_dir = work_dir / "engines" / backend
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"backend": backend, "built": [], "up_to_date": [], "engines": {}}
    for name in names:
        model = contracts[name]
        entry = mf.load(work_dir).get("engines", {}).get(backend, {}).get(name)
        onnx_hash, files = current_hash(work_dir, man, name, entry)
        profile = profile_for(model, ranges, guidance, cfg.vae_factor, max_prompt_chunks, cfg.text_len)
        weights = refit_names(man, name) if refit else []
        key = engine_key(backend, trt, onnx_hash, profile, model_options(
            model, {**options, "precision": mf.model_precision(man, name), "refit": bool(weights)},
            max_prompt_chunks), io=io_digest(model))
        plan_path = out_dir / f"{name}.plan"
        why = first_change(entry.get("key") or {}, key) if entry else None
        if (entry and why is None and plan_path.is_file()
                and plan_path.stat().st_size == entry.get("size_bytes")):
            print(f"{name}: up to date ({plan_path.relative_to(work_dir)})", file=sys.stderr)
            result["up_to_date"].append(name)
            result["engines"][name] = entry
            continue
        print(f"building {name} ({backend} {trt.__version__}{', ' + why if why else ''}) …",
              file=sys.stderr, flush=True)
        plan, seconds, cache_bytes2 = _build_one(trt, api, backend, model, files, profile, key["options"],
                                                 cache_bytes, progress, weights)
        if cache_bytes2 is not None:
            cache_bytes = cache_bytes2
        write_atomic(plan_path, plan)
        size = plan_path.stat().st_size
        del plan
        entry = {"file": str(plan_path.relative_to(work_dir)), "size_bytes": size,
                 "build_s": round(seconds, 3), "key": key, "onnx_stat": onnx_stat(files)}
        latest = mf.load(work_dir)  # re-read: record only our entry
        latest.setdefault("engines", {}).setdefault(backend, {})[name] = entry
        write_json_atomic(work_dir / mf.NAME, latest)
        print(f"{name}: done in {seconds:.1f} s, {size / 2**20:.1f} MB", file=sys.stderr)
        result["built"].append(name)
        result["engines"][name] = entry
    if cache_bytes and cache_bytes != loaded_cache:
        write_atomic(timing_cache, cache_bytes)
    return result
