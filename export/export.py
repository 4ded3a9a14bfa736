"""`sdrt export MODEL_DIR WORK_DIR`: pipeline folder -> validated ONNX + manifest.

The work folder is written beside its final place and renamed in at the end, so a failed export
leaves nothing (and a previous export stays intact until the new one is complete).
"""
from __future__ import annotations

import gc
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import sdrt
from sdrt import contract
from sdrt import manifest as mf
from sdrt.contract import (MAX_CONTROLNETS, STEP_COLUMNS, Dims, ModelConfig, Variant, all_models, control_image,
                           step_models)
from sdrt.errors import UserError
from sdrt.fileio import default_mode_tree, temp_dir_beside, write_json_atomic
from sdrt.export import (attention, compose_step, controlnet, lora_targets, pipeline_folder, scheduler_config, single_file,
                         to_onnx, upscaler, validate)

BASE_MODELS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
TOKEN_TABLE = "token_embedding.npy"


def step_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The step graphs of this UNet's export (sdrt.contract.Step.of_unet)."""
    return tuple(m.name for m in step_models(cfg, "fp32"))


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_work_dir(work_dir: Path, force: bool = False) -> None:
    """A new or empty folder; a previous export only with force (the new one replaces it whole,
    built engines included); never a folder that is not an export."""
    if not work_dir.exists() or (work_dir.is_dir() and not any(work_dir.iterdir())):
        return
    if not (work_dir / mf.NAME).is_file():
        raise UserError(f"{work_dir} exists and is not a previous sdrt export: choose a new WORK_DIR")
    if not force:
        raise UserError(f"{work_dir} already holds an export (and its engines/): choose a new WORK_DIR "
                        "or pass --force to replace it whole")


def validation_dims(cfg: ModelConfig) -> Dims:
    """A shape other than the traced one, small enough for 2 CPU cores (at most 15x18 latents:
    120x144 px on SD): an odd latent height and an even latent width, so a graph that only works
    at even sizes fails here."""
    h = min(max(cfg.sample_hw[0] // 2, 4), 14) | 1
    return Dims(batch=1, height=h * cfg.vae_factor, width=(h + 3) * cfg.vae_factor, cfg=True,
                vae_factor=cfg.vae_factor, chunks=2, text_len=cfg.text_len)  # 2 chunks: a long prompt


def export(model_dir: Path, work_dir: Path, precision: str = "fp16", opset: int | None = None,
           ort_fusion: bool = False, attention_form: str = "op", tokenizer: Path | None = None,
           config: str | None = None, prediction_type: str | None = None,
           vae_precision: str | None = None, text_encoder_precision: str | None = None,
           force: bool = False, controlnets=()) -> Path:
    """opset None: 23 for attention_form "op" (ONNX's Attention op), 18 for "decomposed".
    model_dir: a diffusers folder, or a single-file .safetensors/.ckpt checkpoint (then tokenizer,
    config and prediction_type apply: sdrt.export.single_file). force: replace a previous export
    in work_dir (else refused). controlnets: diffusers ControlNetModel folders, exported beside the
    UNet with step graphs that run them (in this order)."""
    model_dir, work_dir = Path(model_dir), Path(work_dir)
    controlnets = tuple(Path(c) for c in controlnets)
    if len(controlnets) > MAX_CONTROLNETS:
        raise UserError(f"{len(controlnets)} --controlnet folders: sdrt takes at most {MAX_CONTROLNETS}")
    per_model = precisions(precision, vae_precision, text_encoder_precision)
    opset = attention.resolve_opset(attention_form, opset)
    check_work_dir(work_dir, force)
    if single_file.is_single_file(model_dir):
        return _export_single_file(model_dir, work_dir, tokenizer, config, prediction_type,
                                   per_model, opset, ort_fusion, attention_form, controlnets=controlnets)
    if (tokenizer, config, prediction_type) != (None, None, None):
        raise UserError("--tokenizer, --config and --prediction-type apply to single-file checkpoints "
                        "(.safetensors, .ckpt); a diffusers folder carries its own")
    pipeline_folder.read_model_index(model_dir)
    return _export_folder(model_dir, work_dir, per_model, opset, ort_fusion, attention_form, None,
                          controlnets=controlnets)


def precisions(precision: str, vae: str | None, text_encoder: str | None) -> dict:
    """Precision per exported torch module (the step graphs are the UNet's): the UNet follows
    --precision; the VAE and the text encoder may be FP32 in an FP16 export (SD 2.x and many
    fine-tuned VAEs overflow FP16). Recorded once per model, manifest["models"][name]["precision"]."""
    for flag, value in (("--precision", precision), ("--vae-precision", vae),
                        ("--text-encoder-precision", text_encoder)):
        if value not in (None, "fp16", "fp32"):
            raise UserError(f"unknown {flag} {value!r}: use fp16 or fp32")
    if precision is None:
        raise UserError("--precision must be fp16 or fp32")
    return {"text_encoder": text_encoder or precision, "unet": precision, "vae_decoder": vae or precision,
            "vae_encoder": vae or precision}


def _export_single_file(path: Path, work_dir: Path, tokenizer, config, prediction_type, *args,
                        controlnets=()) -> Path:
    """Convert to a diffusers folder beside WORK_DIR (diffusers' loaders), export that, remove it."""
    conv = temp_dir_beside(work_dir)
    try:
        found = single_file.to_folder(path, conv / "model", tokenizer, config, prediction_type, say)
        source = {"path": str(path.resolve()), "sha256": {"file": mf.sha256_file(path)},
                  "single_file": found}
        return _export_folder(conv / "model", work_dir, *args, source, controlnets=controlnets)
    finally:
        shutil.rmtree(conv, ignore_errors=True)


def _export_folder(model_dir: Path, work_dir: Path, per_model: dict, opset: int, ort_fusion: bool,
                   attention_form: str, source: dict | None, controlnets=()) -> Path:
    tmp = temp_dir_beside(work_dir)
    try:
        _export_into(model_dir, tmp, per_model, opset, ort_fusion, attention_form, source, controlnets)
        default_mode_tree(tmp)            # onnx writes *.onnx.data as 0600: readable like the rest
        _swap_in(tmp, work_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return work_dir


def _export_into(model_dir: Path, out: Path, precisions: dict, opset: int, ort_fusion: bool,
                 form: str, source: dict | None = None, controlnets=()) -> None:
    t0 = time.perf_counter()
    precision = precisions["unet"]
    index = pipeline_folder.read_model_index(model_dir)
    sched, updated = scheduler_config.effective_config(model_dir / "scheduler", index["scheduler"][1],
                                                       rewrite=not upscaler.is_upscaler(index))
    scheduler_config.warn_if_updated(updated)
    pipeline_folder.check_tokenizer(model_dir / "tokenizer", pipeline_folder.text_vocab_size(model_dir))
    cns = [controlnet.load(p) for p in controlnets]          # refused before the base is loaded
    unet_config, vae_config = (controlnet.read_config(model_dir / c) for c in ("unet", "vae"))
    layouts = [controlnet.check_fits(cn, unet_config, vae_config.latent_channels, p)
               for cn, p in zip(cns, controlnets)]
    say(f"loading {model_dir} ...")
    folder = pipeline_folder.load(model_dir)
    cfg = folder.config = replace(folder.config, controlnets=len(cns))
    if cfg.upscaler and cns:
        raise UserError("--controlnet applies to text-to-image UNets: this folder holds an upscaler's UNet")
    extra = {upscaler.KEY: upscaler.record(model_dir, index, cfg.class_embeds)} if cfg.upscaler else {}
    models = all_models(cfg, precision)
    cn_models = [contract.controlnet(cfg, precision, k, lay) for k, lay in enumerate(layouts)]
    models.update({m.name: m for m in cn_models})
    cn_files = [(out / "onnx" / m.onnx, m) for m in cn_models]
    (out / "onnx").mkdir()
    vdims = validation_dims(cfg)
    trace = to_onnx.trace_dims(cfg.sample_hw, folder.unet.num_upsamplers, cfg.text_len)
    records = {}
    for i, name in enumerate(BASE_MODELS + tuple(m.name for m in cn_models) + step_names(cfg), 1):
        model, path = models[name], out / "onnx" / models[name].onnx
        precision_of = precisions["unet" if model.step or name not in BASE_MODELS else name]
        t = time.perf_counter()
        say(f"[{i}/{len(models)}] {name}: exporting {precision_of} ...")
        if name not in BASE_MODELS and not model.step:          # ControlNet k
            k = cn_models.index(model)
            module = controlnet.module(cns[k])
            to_onnx.export(module, model, path, _control_inputs(folder, model, to_onnx.image_trace_dims(
                trace, cfg.vae_factor), 0), precision_of, opset, form, external=True)
            inputs = _control_inputs(folder, model, vdims, 1)
            ref = validate.run_torch(module, model, inputs)
        elif name in BASE_MODELS:
            module = to_onnx.wrap(name, folder)
            traced = to_onnx.image_trace_dims(trace, cfg.vae_factor) if name == "vae_encoder" else trace
            to_onnx.export(module, model, path, _inputs(folder, model, traced, 0, precision),
                           precision_of, opset, form)
            inputs = _inputs(folder, model, vdims, 1, precision)
            ref = validate.run_torch(module, model, inputs)
        else:
            compose_step.compose(out / "onnx" / models["unet"].onnx, models["unet"], model, path, cn_files)
            inputs, ref = _step_reference(folder, model, vdims, sched, cns)
        records[name] = _validated_record(out, name, model, path, inputs, ref, precision_of, t,
                                          f"[{i}/{len(models)}]")
        records[name]["precision"] = precision_of          # the one record of it (mf.model_precision)
        if name in BASE_MODELS:
            records[name]["attention_ops"] = attention.count_ops(to_onnx.onnx_graph(path))
        if name == "text_encoder":
            records[name]["validation"]["deepest_clip_skip"] = _check_deepest_clip_skip(
                module, model, path, inputs, precision_of, cfg.text_layers)
        if name in to_onnx.WEIGHTS_BESIDE:
            records[name]["lora_targets"] = _lora_targets(module, path, precision_of, name)
        elif model.step:  # the step graphs read the UNet's initializers (same names, file)
            records[name]["weights_of"] = "unet"
        elif model in cn_models:
            records[name]["source"] = {"path": str(controlnets[cn_models.index(model)].resolve()),
                                       "layout": layouts[cn_models.index(model)].to_json()}
    token_embedding = _write_token_table(folder, out, precision)   # the contract's dtype (the UNet's)
    variants = {"ort": _export_ort_variant(folder, models, out, precision, opset, form, vdims, sched)} \
        if ort_fusion else {}
    shutil.copytree(model_dir / "tokenizer", out / "tokenizer")
    (out / "scheduler").mkdir()
    write_json_atomic(out / "scheduler" / "scheduler_config.json", sched)
    write_json_atomic(out / mf.NAME, {
        "format": mf.FORMAT, "precision": precision, "opset": opset, "attention": form,
        "config": cfg.to_json(), "scheduler": {"config": sched, "updated": updated}, "models": records, "variants": variants, "engines": {},
        "token_embedding": token_embedding, **extra,
        "source": source or {"path": str(model_dir.resolve()), "sha256": _component_hashes(model_dir)},
        "versions": _versions(), "export_s": round(time.perf_counter() - t0, 1)})
    say(f"export done in {time.perf_counter() - t0:.1f} s")


def _inputs(folder, model, dims: Dims, seed: int, precision: str) -> dict:
    """Random contract inputs; the text encoder gets rows of its own token table (real inputs)."""
    inputs = to_onnx.example_inputs(model, dims, folder.config.vocab_size, seed=seed,
                                    classes=folder.config.class_embeds)
    if model.name == "text_encoder":
        table = to_onnx.token_table(folder.text_encoder, precision)
        inputs["inputs_embeds"] = to_onnx.token_embeddings(table, dims, seed)
    return inputs


def _check_deepest_clip_skip(module, model, path: Path, inputs: dict, precision: str, layers: int) -> dict:
    """The text encoder validated again at the largest clip skip (the first layer's output)."""
    inputs = {**inputs, "clip_skip": np.array([layers], np.int32)}
    record = validate.check(model, validate.run_onnx(path, inputs), validate.run_torch(module, model, inputs),
                            precision)
    say(f"  text_encoder at clip skip {inputs['clip_skip'][0]}: rel L2 error {record['rel_l2']:.2e}")
    return {"clip_skip": int(inputs["clip_skip"][0]), "rel_l2": record["rel_l2"]}


def _write_token_table(folder, out: Path, precision: str) -> dict:
    """WORK_DIR/token_embedding.npy: the rows the runtime looks token ids up in (the graph takes
    embeddings, so new tokens need no new graph)."""
    table = to_onnx.token_table(folder.text_encoder, precision)
    np.save(out / TOKEN_TABLE, table, allow_pickle=False)
    return {"file": TOKEN_TABLE, "dtype": table.dtype.name, "shape": list(table.shape),
            "sha256": mf.sha256_file(out / TOKEN_TABLE)}


def _lora_targets(module, path: Path, precision: str, name: str) -> dict:
    """Torch Linear/Conv weight -> ONNX initializer map of one graph (sdrt.export.lora_targets)."""
    targets, missing = lora_targets.record(module, path, precision)
    if missing:
        say(f"  {name}: {len(missing)} Linear/Conv weights not found among the initializers "
            f"(e.g. {missing[0]}): LoRA modules on them will be refused")
    return targets


def _validated_record(out: Path, name: str, model, path: Path, inputs: dict, ref: list,
                      precision: str, t: float, tag: str) -> dict:
    """Validate one graph on ORT CPU and describe it for the manifest."""
    say(f"{tag} {name}: validating on ONNX Runtime CPU ...")
    record = validate.check(model, validate.run_onnx(path, inputs), ref, precision)
    rel = path.relative_to(out / "onnx")
    files = [str(rel)] + [str(rel.parent / loc) for loc in external_data_locations(path)]
    paths = mf.model_files(out, {"models": {name: {"files": files}}}, name)
    sha = mf.files_sha256(paths)
    say(f"{tag} {name}: rel L2 error {record['rel_l2']:.2e} (tolerance {record['tolerance']:.0e}), "
        f"{time.perf_counter() - t:.1f} s")
    return {"contract": model.to_json(), "files": files, "sha256": sha, "bytes": sum(p.stat().st_size for p in paths),
            "validation": record, "export_s": round(time.perf_counter() - t, 2)}


def _export_ort_variant(folder, models, out: Path, precision: str, opset: int, form: str, vdims: Dims,
                        sched: dict) -> dict:
    """onnx/ort/: the UNet with ONNX Runtime's attention fusion and the step graphs on top.
    ORT's optimizer fuses the decomposed FP32 graph, so that is what it is given."""
    from sdrt.export import ort_fusion
    ort_dir = out / "onnx" / "ort"
    ort_dir.mkdir()
    t = time.perf_counter()
    unet, module = models["unet"], to_onnx.wrap("unet", folder)
    src = out / "onnx" / unet.onnx
    if precision == "fp16" or form == "op":
        src = ort_dir / "fp32" / unet.onnx
        src.parent.mkdir()
        fp32 = all_models(folder.config, "fp32")["unet"]
        say("[ort] unet: exporting fp32, decomposed attention, for fusion ...")
        to_onnx.export(module, fp32, src, to_onnx.example_inputs(
            fp32, to_onnx.trace_dims(folder.config.sample_hw, folder.unet.num_upsamplers, folder.config.text_len),
            folder.config.vocab_size), "fp32",
            min(opset, attention.TRACE_OPSET_MAX), "decomposed")
    # every torch reference first: the fusion of a 3.4 GB graph needs the memory the modules hold
    unet_in = to_onnx.example_inputs(unet, vdims, folder.config.vocab_size, seed=1)
    refs = {"unet": (unet_in, validate.run_torch(module, unet, unet_in))}
    ort_steps = tuple(n for n in step_names(folder.config) if not models[n].step.controlnets)
    refs.update({n: _step_reference(folder, models[n], vdims, sched) for n in ort_steps})
    del module
    folder.text_encoder = folder.unet = folder.vae = None
    gc.collect()
    say("[ort] unet: fusing attention (onnxruntime.transformers) ...")
    ops = ort_fusion.fuse_unet_in_subprocess(src, ort_dir / unet.onnx, precision)
    if src.parent != out / "onnx":
        shutil.rmtree(src.parent)
    records = {"unet": {**_validated_record(out, "unet", unet, ort_dir / unet.onnx, *refs["unet"],
                                            precision, t, "[ort]"), "fused_ops": ops}}
    for name in ort_steps:                 # steps with ControlNets run the plain graphs (onnx/)
        t, model = time.perf_counter(), models[name]
        compose_step.compose(ort_dir / unet.onnx, unet, model, ort_dir / model.onnx)
        records[name] = _validated_record(out, name, model, ort_dir / model.onnx, *refs[name],
                                          precision, t, "[ort]")
    return records


def _control_inputs(folder, model, dims: Dims, seed: int) -> dict:
    """A ControlNet's inputs: random latents and text, a conditioning image in [0, 1]."""
    inputs = to_onnx.example_inputs(model, dims, folder.config.vocab_size, seed=seed)
    image = inputs["controlnet_cond"]
    inputs["controlnet_cond"] = np.random.default_rng(seed).random(image.shape).astype(image.dtype)
    return inputs


def _step_reference(folder, step, dims: Dims, sched_config: dict, controlnets=()):
    """Inputs for a denoise-step graph and the expected output from torch UNet + numpy sampler
    rows (+ the variant's own part, REFERENCES, written out here independently of the graph; with
    ControlNets, torch ControlNets + UNet with their residuals: sdrt.export.controlnet).
    Batch 2 at different steps of a DPM++ 2M SDE table (every sampler term non-zero, a model-input
    scale of 0.8 written in), each sample its own row and noise row (and ControlNet scales)."""
    import torch

    from sdrt.engine import samplers
    guidance, (unet_input, finish) = step.step.guidance, REFERENCES[step.step.variant]
    steps, ks = 50, np.array([10, 23], np.int32)
    d = Dims(2, dims.height, dims.width, cfg=guidance, vae_factor=dims.vae_factor, chunks=dims.chunks,
             text_len=dims.text_len, noise_steps=steps)
    table = samplers.step_table(sched_config, samplers.Sampler("dpmpp_2m_sde"), steps,
                                7.5 if guidance else 1.0).rows
    table[:, STEP_COLUMNS.index("model_in_scale")] = 0.8
    inputs = to_onnx.example_inputs(step, d, folder.config.vocab_size, seed=2, classes=folder.config.class_embeds)
    inputs["step_table"], inputs["step_index"] = table, ks
    n_cn = step.step.controlnets
    scales = [np.array([0.8, 0.5]) - 0.3 * i for i in range(n_cn)]   # per ControlNet, per sample's row
    table = np.concatenate([table, np.zeros((len(table), n_cn), np.float32)], 1)
    for i, s in enumerate(scales):
        table[ks, len(STEP_COLUMNS) + i] = s
    inputs["step_table"] = table
    rng = np.random.default_rng(3)
    images = [rng.random(inputs[control_image(i)].shape).astype(np.float32) for i in range(n_cn)]
    inputs.update({control_image(i): im for i, im in enumerate(images)})
    if "mask" in inputs:  # a binary mask, as the runtime feeds it
        inputs["mask"] = (inputs["mask"] > 0).astype(np.float32)
    rows = table[ks]
    row = {c: rows[:, i, None, None, None] for i, c in enumerate(STEP_COLUMNS)}   # per sample
    x = inputs["latents"]
    u = unet_input({**inputs, "latents": x * row["model_in_scale"]})
    emb = torch.from_numpy(inputs["text_embeddings"].astype(np.float32))
    t = torch.from_numpy(rows[:, 0].astype(np.float32))
    sample = torch.from_numpy(np.concatenate([u, u]) if guidance else u)
    if n_cn:
        m = controlnet.step_reference(folder.unet, controlnets[:n_cn], u, rows[:, 0], emb.numpy(), images, scales,
                                      guidance, cn_input=x * row["model_in_scale"] if u.shape[1] != x.shape[1] else None)
    else:
        labels = torch.from_numpy(inputs["class_labels"]).long() if "class_labels" in inputs else None
        with torch.no_grad():
            m = folder.unet(sample, torch.cat([t, t]) if guidance else t, emb, class_labels=labels,
                            return_dict=False)[0].numpy()
    if guidance:
        uncond, cond = np.split(m, 2)
        m = uncond + row["guidance"] * (cond - uncond)
    outs = [samplers.apply_row(rows[b], x[b], m[b], inputs["x0_prev"][b], inputs["step_noise"][b, ks[b]])
            for b in range(2)]
    x_prev, x0 = np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs])
    return inputs, [finish(inputs, row, x_prev), ks + 1, x0]


# Each variant's own part in numpy, (UNet input u, latents_next from x_{t-1}): the reference the
# composed graph (sdrt.export.compose_step.GRAPHS) is validated against.
def unet_input_latents(inputs: dict) -> np.ndarray:
    """u = x_t"""
    return inputs["latents"]


def unet_input_concat(inputs: dict) -> np.ndarray:
    """u = concat(x_t, mask, masked-image latents): the 9-channel inpainting UNet."""
    return np.concatenate([inputs["latents"], inputs["mask"], inputs["masked_image_latents"]], 1)


def unet_input_upscale(inputs: dict) -> np.ndarray:
    """u = concat(x_t, noised low-resolution image): the x4 upscaler's UNet (the sampler's input
    scale applies to x_t only, as diffusers' pipeline orders it)."""
    return np.concatenate([inputs["latents"], inputs["low_res_image"]], 1)


def finish_plain(inputs: dict, row: dict, x_prev: np.ndarray) -> np.ndarray:
    """latents_next = x_{t-1}"""
    return x_prev


def finish_blend(inputs: dict, row: dict, x_prev: np.ndarray) -> np.ndarray:
    """The known region (mask 0), re-noised to the next timestep, put back."""
    known = row["sqrt_alpha_next"] * inputs["image_latents"] + row["sqrt_one_minus_alpha_next"] * inputs["noise"]
    return (1 - inputs["mask"]) * known + inputs["mask"] * x_prev


REFERENCES = {Variant.plain: (unet_input_latents, finish_plain),
              Variant.blend: (unet_input_latents, finish_blend),
              Variant.concat: (unet_input_concat, finish_plain),
              Variant.upscale: (unet_input_upscale, finish_plain)}


def external_data_locations(path: Path) -> list[str]:
    """Sorted names of the external data files the graph's initializers point at."""
    proto = to_onnx.onnx_graph(path)
    return sorted({e.value for t in proto.graph.initializer for e in t.external_data
                   if e.key == "location"})


def _component_hashes(model_dir: Path) -> dict:
    out = {}
    for comp in pipeline_folder.COMPONENTS:
        files = sorted(p for p in (model_dir / comp).rglob("*") if p.is_file())
        out[comp] = mf.sha256_bytes("".join(p.name + mf.sha256_file(p) for p in files).encode())
    return out


def _versions() -> dict:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import transformers
    return {"sdrt": sdrt.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _swap_in(tmp: Path, work_dir: Path) -> None:
    """Replace a previous export (or nothing) with the finished one."""
    old = None
    if work_dir.exists():
        old = work_dir.with_name(f".{work_dir.name}.old.{time.time_ns()}")
        work_dir.rename(old)
    tmp.rename(work_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

