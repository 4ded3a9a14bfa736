"""The `sdrt` command. Each subcommand imports only what it needs: `generate` never loads torch."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import sdrt
from sdrt.errors import UserError
from sdrt.extras import missing, require, require_all


def cmd_init(a):
    if a.arch == "demo":
        from sdrt.demo import copy_demo_model
        out = copy_demo_model(a.dir, force=a.force)
        print(f"copied the trained demo pipeline to {out}")
        return
    from sdrt.export.init_models import init
    out = init(a.dir, a.arch, seed=a.seed, force=a.force)
    print(f"wrote {a.arch} pipeline to {out}")


def cmd_export(a):
    from sdrt.export.single_file import go_offline
    go_offline()                # models come from disk only: before diffusers/transformers load
    require("export", "exporting a model")
    from sdrt.export.export import export
    out = export(a.model_dir, a.work_dir, precision=a.precision, opset=a.opset, ort_fusion=a.ort_fusion,
                 attention_form=a.attention, tokenizer=a.tokenizer, config=a.config,
                 prediction_type=a.prediction_type, vae_precision=a.vae_precision,
                 text_encoder_precision=a.text_encoder_precision, force=a.force, controlnets=a.controlnet)
    print(f"wrote {out}")


def cmd_build(a):
    from sdrt.export.build import build
    build(a.work_dir, a.backend, height=a.height, width=a.width, batch=a.batch, dynamic=a.dynamic,
          opt_level=a.opt_level, timing_cache=a.timing_cache, guidance=not a.no_guidance,
          workspace_mb=a.workspace_mb, inpaint=a.inpaint, max_prompt_chunks=a.max_prompt_chunks,
          refit=a.refit, control=a.control)


def cmd_generate(a):
    from sdrt.engine.request import GenerateRequest
    from sdrt.generate import generate_files, load_latents
    request = GenerateRequest(a.prompt, a.negative, steps=a.steps, guidance=a.guidance, height=a.height,
                              width=a.width, batch=a.batch, seed=a.seed, latents=load_latents(a.latents),
                              image=a.image, mask=a.mask, strength=a.strength, resize=a.resize,
                              clip_skip=a.clip_skip, embeddings=a.embedding, loras=a.lora,
                              vae_batch=a.vae_batch, prompt_syntax=a.prompt_syntax, sampler=a.sampler,
                              schedule=a.schedule, noise=load_latents(a.noise, "noise"),
                              cfg_cutoff=a.cfg_cutoff, control=a.control or None,
                              control_preprocess=a.control_preprocess, noise_level=a.noise_level,
                              image_noise=load_latents(a.image_noise, "image noise"),
                              guess_mode=a.guess_mode, class_label=a.class_label)
    generate_files(a.work_dir, request, a.out, backend=a.backend, timings=a.timings)


def cmd_bench(a):
    if a.compare:
        if a.work_dirs or a.reference:
            raise UserError("--compare takes result files only: leave out WORK_DIR and --reference")
        require("bench", "plots of the comparison")
        from sdrt.benchmarks.report import compare
        for p in compare(a.compare, a.out):
            print(f"wrote {p}")
        return
    reference = a.reference is not None or not (a.work_dirs or a.no_reference)
    # before any timed work: plots (bench), the diffusers reference (export; --no-reference skips it)
    require_all(["bench", "export"] if reference else ["bench"],
                "a benchmark with the diffusers reference" if reference else "a benchmark")
    from sdrt.benchmarks.bench import bench
    bench(a.work_dirs, a.reference, backends=a.backends, sizes=a.sizes, steps=a.steps, batches=a.batches,
          runs=a.runs, warmup=a.warmup, out=a.out, no_reference=a.no_reference, image=a.image, mask=a.mask,
          strength=a.strength, interleave=a.interleave, control=a.control)


def cmd_bench_lora(a):
    from sdrt.benchmarks.lora_switch import bench_lora
    for p in bench_lora(a.work_dir, backend=a.backend, rank=a.rank, steps=a.steps, size=a.size, out=a.out):
        print(f"wrote {p}")


def cmd_bench_serve(a):
    from sdrt.benchmarks import serve_load as sl
    for name in ("requests", "window", "timeout", "steps"):
        if getattr(a, name) <= 0:
            raise UserError(f"--{name} {getattr(a, name)}: give a positive number")
    load = sl.Load(rates=sl.parse_list(a.rates, "rates"), concurrency=sl.parse_list(a.concurrency, "concurrency", int),
                   requests=a.requests, window_s=a.window, timeout_s=a.timeout, steps=a.steps, size=a.size)
    if a.work_dir and a.url:
        raise UserError("give WORK_DIR (the benchmark starts the server) or --url (a running server), not both")
    sl.bench_serve(a.work_dir, url=a.url, policies=sl.parse_policies(a.batching), load=load, max_batch=a.max_batch,
                   max_queue=a.max_queue, api_key=a.api_key, out=a.out)


def cmd_memory(a):
    require("export", "the memory estimate (ONNX shape inference)", modules=("onnx",))
    from sdrt.benchmarks.memory import main
    main(a.work_dirs, sizes=a.sizes, batches=a.batches, backend=a.backend, out=a.out, vae_batch=a.vae_batch)


def cmd_doctor(a):
    from sdrt.doctor import doctor
    return doctor(a.work_dir, json_out=a.json)


def cmd_demo(a):
    from sdrt.demo import main
    main(a.dir, a.prompt, backend=a.backend, steps=a.steps, guidance=a.guidance, seed=a.seed, out=a.out,
         upscale_images=not a.no_upscale)


def cmd_train_demo(a):
    for name in ("steps", "vae_steps", "upscaler_steps", "upscaler_vae_steps"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(a, name)}: give at least 1")
    if a.stage != "upscaler" and a.base is not None:
        raise UserError("--base is the upscaler stage's base model: use it with --stage upscaler")
    if a.stage == "upscaler" and (a.steps is not None or a.vae_steps is not None):
        raise UserError("--steps and --vae-steps train the base model: with --stage upscaler give "
                        "--upscaler-steps / --upscaler-vae-steps")
    if a.stage == "base" and (a.upscaler_steps is not None or a.upscaler_vae_steps is not None):
        raise UserError("--upscaler-steps and --upscaler-vae-steps need --stage upscaler or all")
    up_dir = a.out_dir if a.stage == "upscaler" else a.out_dir.with_name(a.out_dir.name + "-upscaler")
    for d in (a.out_dir, up_dir) if a.stage == "all" else ():
        if d.exists() and not a.force:     # before an hour of training the base model
            raise UserError(f"{d} already exists: choose a new OUT_DIR or pass --force to replace it")
    require("export", "training the demo model")
    from sdrt.export import train_demo, train_upscaler
    base = a.out_dir
    if a.stage in ("base", "all"):
        base = train_demo.train(a.out_dir, steps=a.steps, seed=a.seed, vae_steps=a.vae_steps, force=a.force)
        print(f"wrote {base}")
    if a.stage in ("upscaler", "all"):
        from sdrt.demo import DEMO_MODEL
        out = train_upscaler.train(up_dir, base=(a.base or DEMO_MODEL) if a.stage == "upscaler" else base,
                                   steps=a.upscaler_steps, vae_steps=a.upscaler_vae_steps, seed=a.seed,
                                   force=a.force)
        print(f"wrote {out}")


def cmd_eval(a):
    from sdrt.benchmarks.eval import main
    main(a.work_dir, backend=a.backend, n=a.n, steps=a.steps, guidance=a.guidance, seed=a.seed, out=a.out,
         grid_path=a.grid, sampler=a.sampler, schedule=a.schedule, cfg_cutoff=a.cfg_cutoff,
         upscaler=a.upscaler, upscaler_steps=a.upscaler_steps, noise_level=a.noise_level)


def cmd_serve(a):
    if a.ray or a.replicas is not None or a.autoscale is not None or a.ray_address is not None:
        return cmd_serve_ray(a)
    from sdrt.serve.server import serve
    return serve(a.work_dir, host=a.host, port=a.port, backend=a.backend, max_batch=a.max_batch,
                 max_queue=a.max_queue, timeout=a.timeout, api_key=a.api_key, batching=a.batching,
                 lora_dir=a.lora_dir, embedding_dir=a.embedding_dir, max_body_mb=a.max_body_mb)


def cmd_serve_ray(a):
    from sdrt.serve.server import check_deps, importable
    check_deps()
    if not importable("ray"):
        raise UserError("sdrt serve --ray needs Ray Serve: pip install 'sdrt[ray]'")
    from sdrt.serve import ray_app
    return ray_app.run(a.work_dir, a.host, a.port, replicas=a.replicas, autoscale=a.autoscale,
                       ray_address=a.ray_address, num_cpus=a.num_cpus, num_gpus=a.num_gpus, backend=a.backend,
                       max_batch=a.max_batch, max_queue=a.max_queue, timeout=a.timeout,
                       api_key=a.api_key or os.environ.get("SDRT_API_KEY") or None, batching=a.batching,
                       lora_dir=a.lora_dir, embedding_dir=a.embedding_dir, max_body_mb=a.max_body_mb)


def cmd_bench_ray(a):
    from sdrt.serve.server import check_deps, importable
    check_deps()
    if not importable("ray"):
        raise UserError("sdrt bench-ray needs Ray Serve: pip install 'sdrt[ray]'")
    from sdrt.benchmarks.serve_ray import main
    main(a.work_dir, requests=a.requests, concurrency=a.concurrency, steps=a.steps, max_batch=a.max_batch,
         out=a.out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdrt", description="Stable Diffusion inference engine: "
                                "diffusers folder -> ONNX -> TensorRT / ONNX Runtime")
    p.add_argument("--version", action="version", version=f"sdrt {sdrt.__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("init", help="write a random-weight pipeline folder (tiny or SD 1.5 shaped), "
                                    "or copy the trained demo model (--arch demo)")
    s.add_argument("dir", type=Path)
    s.add_argument("--arch", choices=("tiny", "sd15", "demo", "tiny-inpaint", "sd15-inpaint", "tiny-controlnet", "sd15-controlnet",
                                       "tiny-upscaler", "tiny-ldm-bert", "tiny-ldm", "tiny-ldm-sr", "tiny-class-ldm"), default="tiny")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace DIR if it exists")
    s.set_defaults(fn=cmd_init)

    s = sub.add_parser("export", help="export text encoder, UNet, VAE decoder and encoder to validated ONNX")
    s.add_argument("model_dir", type=Path, metavar="MODEL",
                   help="a diffusers folder, or an SD 1.x/2.x .safetensors / .ckpt checkpoint")
    s.add_argument("work_dir", type=Path)
    s.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    s.add_argument("--vae-precision", help="fp32: the VAE (decoder and encoder) in FP32 while the rest follows "
                   "--precision (for VAEs that overflow FP16: black or NaN images)")
    s.add_argument("--text-encoder-precision", help="fp32: the text encoder in FP32 while the rest follows --precision")
    s.add_argument("--attention", default="op",
                   help="op: one ONNX Attention op per attention (opset 23; ORT CUDA, TensorRT >= 10.14, RTX); "
                        "decomposed: MatMul/Softmax/MatMul (TensorRT < 10.14, e.g. JetPack 6)")
    s.add_argument("--opset", type=int, help="default 23 with --attention op, 18 with decomposed")
    s.add_argument("--ort-fusion", action="store_true",
                   help="also write onnx/ort/: the UNet with ONNX Runtime's attention fusion (ORT backends use it)")
    s.add_argument("--tokenizer", type=Path, help="single file: a CLIP tokenizer folder (tokenizer/ of any "
                   "diffusers SD folder); default: the local Hugging Face cache")
    s.add_argument("--config", help="single file: sd1, sd2 or sd2-v instead of what is detected")
    s.add_argument("--prediction-type", help="single file: epsilon or v_prediction instead of what is detected")
    s.add_argument("--force", action="store_true",
                   help="replace a previous export in WORK_DIR (its engines/ and anything else in it go too)")
    s.add_argument("--controlnet", action="append", default=[], type=Path, metavar="CN_DIR",
                   help="a diffusers ControlNetModel folder (or a single-file ControlNet checkpoint) for this model; "
                        "repeatable (their residuals add up)")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("build", help="build TensorRT / TensorRT-RTX engines from an export")
    s.add_argument("work_dir", type=Path)
    s.add_argument("--backend", required=True, help="tensorrt or tensorrt-rtx")
    s.add_argument("--height", type=int)
    s.add_argument("--width", type=int)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--dynamic", help="ranges min:opt:max, e.g. batch=1:1:4,height=256:512:768,width=256:512:768")
    s.add_argument("--opt-level", type=int)
    s.add_argument("--timing-cache", type=Path)
    s.add_argument("--workspace-mb", type=int, help="builder memory limit (Jetson: keep it small)")
    s.add_argument("--no-guidance", action="store_true", help="build the step for guidance <= 1 (no CFG)")
    s.add_argument("--control", action="store_true",
                   help="also build the steps that run the export's ControlNets (generate --control)")
    s.add_argument("--inpaint", action="store_true",
                   help="4-channel UNet: also build the inpainting step (a second UNet engine); "
                        "9-channel inpainting exports build only theirs")
    s.add_argument("--max-prompt-chunks", type=int, default=3,
                   help="longest prompt the engines take, in chunks of 75 tokens (text length 77..77*K)")
    s.add_argument("--refit", action="store_true",
                   help="refittable engines: LoRA switches weights in place (generate --lora) without a rebuild")
    s.set_defaults(fn=cmd_build)

    s = sub.add_parser("generate", help="text to image, image to image (--image), inpainting (--image --mask)")
    add_generate_args(s)
    s.add_argument("--out", type=Path, default=Path("out.png"),
                   help="the image: .png, .jpg/.jpeg or .webp (format by extension); with --batch B: "
                        "NAME-0.EXT ... NAME-{B-1}.EXT; missing folders are created")
    s.add_argument("--timings", action="store_true", help="print per-stage timings")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("bench", help="benchmark sdrt backends against the eager diffusers pipeline")
    s.add_argument("work_dirs", type=Path, nargs="*", metavar="WORK_DIR",
                   help="one export, or several of the same model to compare (e.g. --attention op vs decomposed); "
                        "none: the demo model's export (made in ./sdrt-demo if absent)")
    s.add_argument("--reference", type=Path, help="the diffusers pipeline folder (default with no WORK_DIR: "
                                                   "the demo model)")
    s.add_argument("--backends", default="available",
                   help="'available' (what runs here) or a comma list of tensorrt, tensorrt-rtx, onnxruntime-cuda, "
                        "onnxruntime-cpu")
    s.add_argument("--sizes", help="comma list of HxW (default: the model's own size, e.g. 512x512 for SD 1.5, "
                                   "32x32 for the demo; with --image: the image's size)")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--batches", default="1,4,8")
    s.add_argument("--image", type=Path, help="benchmark image to image from this image (times the VAE encoder)")
    s.add_argument("--mask", type=Path, help="with --image: benchmark inpainting")
    s.add_argument("--strength", type=float, help="default 0.75 (image to image), 1.0 (inpainting)")
    s.add_argument("--control", action="append", metavar="IMAGE[:SCALE[:START:END]]",
                   help="benchmark text to image with the export's ControlNets, one per ControlNet in export order "
                        "(the reference: diffusers' ControlNet pipeline)")
    s.add_argument("--runs", type=int, default=5, help="timed runs per configuration and contender")
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--interleave", action=argparse.BooleanOptionalAction,
                   help="time the contenders (exports x backends, the reference) in turn, A B A B ..., so a "
                        "shared machine's drift hits all alike (default when there is more than one)")
    s.add_argument("--out", type=Path, default=Path("sdrt-results"),
                   help="folder for the .json, .md and .png (default: ./sdrt-results)")
    s.add_argument("--no-reference", action="store_true", help="skip the diffusers reference")
    s.add_argument("--compare", type=Path, nargs="+", metavar="RESULT.json",
                   help="instead of measuring: a table and plot of two or more result files, matched by "
                        "configuration, with time ratios and whether the runs' spreads overlap")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("bench-lora", help="time LoRA switches on a work folder (random LoRA files shaped for it)")
    s.add_argument("work_dir", type=Path)
    s.add_argument("--backend", default="onnxruntime-cpu")
    s.add_argument("--rank", type=int, default=16)
    s.add_argument("--steps", type=int, default=1, help="denoising steps of each timed generate")
    s.add_argument("--size", type=int, help="image height and width (default: the model's)")
    s.add_argument("--out", type=Path, default=Path("sdrt-results"),
                   help="folder for the .md and .json (default: ./sdrt-results)")
    s.set_defaults(fn=cmd_bench_lora)

    s = sub.add_parser("bench-serve", help="load on sdrt serve over loopback: open loop (Poisson) and closed loop, "
                                           "per batching policy; throughput, latency, queue wait, occupancy")
    s.add_argument("work_dir", type=Path, nargs="?", metavar="WORK_DIR",
                   help="the export to serve (default: the demo model's, made in ./sdrt-demo if absent)")
    s.add_argument("--url", help="load a running server instead (e.g. http://127.0.0.1:7860); one policy")
    s.add_argument("--batching", default="none,request,step", help="policies to compare (comma list)")
    s.add_argument("--rates", default="0.5,1,2", help="open loop: Poisson arrival rates, requests/s")
    s.add_argument("--concurrency", default="1,4,16", help="closed loop: numbers of clients")
    s.add_argument("--requests", type=int, default=24, help="at most this many requests per load point")
    s.add_argument("--window", type=float, default=60, help="no request of a point is sent after this many s")
    s.add_argument("--timeout", type=float, default=120, help="each request waits at most this many s for its job")
    s.add_argument("--steps", type=int, default=10, help="denoising steps per request")
    s.add_argument("--size", type=int, help="image height and width (default: the model's)")
    s.add_argument("--max-batch", type=int, default=4)
    s.add_argument("--max-queue", type=int, default=16)
    s.add_argument("--api-key", help="the server's key (sent as Authorization: Bearer)")
    s.add_argument("--out", type=Path, default=Path("sdrt-results"),
                   help="folder for the .json, .md and .png (default: ./sdrt-results)")
    s.set_defaults(fn=cmd_bench_serve)

    s = sub.add_parser("memory", help="GPU memory a generation needs, and a Jetson budget (no GPU needed)")
    s.add_argument("work_dirs", type=Path, nargs="+", metavar="WORK_DIR")
    s.add_argument("--sizes", default="512x512", help="comma list of HxW")
    s.add_argument("--batches", default="1,4")
    s.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "tensorrt-rtx"),
                   help="whose built engine sizes count as weights (else the ONNX weights); "
                        "auto: the engines that are built, TensorRT first")
    s.add_argument("--out", type=Path, help="write the table here (.md) and the figures beside it (.json)")
    s.add_argument("--vae-batch", type=int, metavar="N",
                   help="the VAE decodes N images at a time (as generate --vae-batch): its activations for N images")
    s.set_defaults(fn=cmd_memory)

    s = sub.add_parser("doctor", help="what is installed, what runs here and why not, and a live check per backend")
    s.add_argument("work_dir", type=Path, nargs="?",
                   help="the export to check (default: the demo model's export, made if missing)")
    s.add_argument("--json", type=Path, metavar="FILE", help="also write everything as JSON")
    s.set_defaults(fn=cmd_doctor)

    s = sub.add_parser("demo", help="the embedded default: the trained demo model -> a captioned grid + timing table")
    s.add_argument("--dir", type=Path, default=Path("sdrt-demo"), help="where the export and the grid go")
    s.add_argument("--prompt", action="append",
                   help="your own sentence, e.g. 'a large green triangle on a white background, top left' "
                        "(repeatable; default: eight example captions)")
    s.add_argument("--backend", default="auto", help="auto (the best available), tensorrt, tensorrt-rtx, "
                                                     "onnxruntime-cuda or onnxruntime-cpu")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=5.0)
    s.add_argument("--seed", type=int, default=0, help="first image's seed (-1: a random one, printed)")
    s.add_argument("--out", type=Path, metavar="FILE",
                   help="the grid (.png, .jpg, .webp); default DIR/demo.png, or DIR/prompts.png with --prompt; "
                        "with one --prompt: that image alone, no caption")
    s.add_argument("--no-upscale", action="store_true",
                   help="skip the x4 upscaler: the 32x32 images (shown 4x, nearest neighbour)")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("serve", help="HTTP server: jobs API with progress and cancel, OpenAI images API, the web "
                                     "UI's API, metrics (the serve extra)")
    s.add_argument("work_dir", type=Path, nargs="?", metavar="WORK_DIR",
                   help="the export to serve (default: the demo model's, made in ./sdrt-demo if missing)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--backend", default="auto", help="auto, tensorrt, tensorrt-rtx, onnxruntime-cuda or onnxruntime-cpu")
    s.add_argument("--max-batch", type=int, default=4, help="images per engine call (and per request)")
    s.add_argument("--max-queue", type=int, default=64, help="jobs waiting; more: 429 with Retry-After")
    s.add_argument("--timeout", type=float, help="seconds a job may take from submission (default: none)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health and the "
                                     "playground page / (default: $SDRT_API_KEY)")
    s.add_argument("--batching", default="request", choices=("none", "request", "step"),
                   help="none: one request per engine call; request: compatible queued requests share one "
                        "call; step: text-to-image requests of one size, guidance on/off and LoRA set join the "
                        "running batch of --max-batch slots between denoising steps and leave after their last "
                        "(image inputs run per request)")
    s.add_argument("--lora-dir", type=Path, help="LoRA .safetensors files, chosen by name (the file's stem)")
    s.add_argument("--embedding-dir", type=Path,
                   help="textual-inversion files, each loaded with its file's stem as the token")
    s.add_argument("--max-body-mb", type=float, default=32, help="largest request body (413 above)")
    r = s.add_argument_group("Ray Serve (the ray extra): the same server as replicas across GPUs and machines")
    r.add_argument("--ray", action="store_true", help="serve through Ray Serve (a local Ray instance unless "
                                                      "--ray-address)")
    r.add_argument("--replicas", type=int, help="replicas, each with its own engine (default 1)")
    r.add_argument("--autoscale", metavar="MIN:MAX", help="Ray Serve's autoscaler on ongoing requests per replica, "
                                                         "between MIN and MAX replicas")
    r.add_argument("--ray-address", help="a running Ray cluster (e.g. auto, or HOST:6379)")
    r.add_argument("--num-cpus", type=float, default=1, help="CPUs reserved per replica (default 1)")
    r.add_argument("--num-gpus", type=float, help="GPUs per replica (default: 1 when the cluster has GPUs)")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("bench-ray", help="sdrt serve vs Ray Serve with 1 and 2 replicas: throughput, p95 "
                                         "latency, cold start (the ray extra; JSON + plot)")
    s.add_argument("work_dir", type=Path, nargs="?", metavar="WORK_DIR",
                   help="the export (default: the demo model's, in ./sdrt-demo)")
    s.add_argument("--requests", type=int, default=32, help="requests of the load (bounded)")
    s.add_argument("--concurrency", type=int, default=4, help="requests at a time")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--max-batch", type=int, default=4)
    s.add_argument("--out", type=Path, help="results folder (default: ./sdrt-results)")
    s.set_defaults(fn=cmd_bench_ray)

    s = sub.add_parser("train-demo", help="train the demo model (shapes on backgrounds, 32x32) and its x4 "
                                          "upscaler (32x32 -> 128x128) into pipeline folders (export extra; "
                                          "about an hour each on 2 CPU cores)")
    s.add_argument("out_dir", type=Path, help="the base model's folder (the upscaler's with --stage upscaler; "
                                              "with all, the upscaler goes to OUT_DIR-upscaler)")
    s.add_argument("--stage", default="all", choices=("all", "base", "upscaler"),
                   help="base: the text-to-image model; upscaler: the x4 upscaler on --base's text encoder")
    s.add_argument("--steps", type=int, help="text encoder + UNet steps (default 4800: the shipped model)")
    s.add_argument("--vae-steps", type=int, help="VAE steps (default 3000: the shipped model)")
    s.add_argument("--upscaler-steps", type=int, metavar="N",
                   help="upscaler UNet steps (default 14000: the shipped upscaler)")
    s.add_argument("--upscaler-vae-steps", type=int, metavar="N",
                   help="upscaler VAE steps (default 5000: the shipped upscaler), then 400 of its decoder alone")
    s.add_argument("--base", type=Path, metavar="DIR",
                   help="--stage upscaler: the demo model whose tokenizer and text encoder it uses "
                        "(default: the shipped one)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    s.set_defaults(fn=cmd_train_demo)

    s = sub.add_parser("eval", help="demo model quality: checker accuracies and domain FID, seen vs held-out captions")
    s.add_argument("work_dir", type=Path)
    s.add_argument("--backend", default="auto")
    s.add_argument("--n", type=int, default=200, help="captions per split (seen, held-out)")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=5.0)
    s.add_argument("--seed", type=int, default=0, help="first image's seed (-1: a random one, in the report)")
    s.add_argument("--out", type=Path, help="also write the report as JSON here")
    s.add_argument("--grid", type=Path, help="also write a PNG of the first 8 images of each split, captioned")
    s.add_argument("--sampler", default="DDIM", help="as sdrt generate's (DDIM, Euler a, DPM++ 2M Karras, ...)")
    s.add_argument("--schedule", metavar="{uniform,trailing,karras}")
    s.add_argument("--cfg-cutoff", type=float, metavar="F")
    s.add_argument("--upscaler", type=Path, metavar="UP",
                   help="also upscale every image x4 with this upscaler (an sdrt export, or a diffusers "
                        "StableDiffusionUpscalePipeline folder run on diffusers) and measure it against bicubic")
    s.add_argument("--upscaler-steps", type=int, metavar="N", help="the upscaler's steps (default: the demo's)")
    s.add_argument("--noise-level", type=int, metavar="N",
                   help="noise level added to the 32x32 images before upscaling (default: the demo's)")
    s.set_defaults(fn=cmd_eval)
    return p


def add_generate_args(s) -> None:
    s.add_argument("work_dir", type=Path)
    s.add_argument("prompt", nargs="?", help="the text (leave out for models without a text encoder: "
                   "unconditional, class-conditional and super-resolution LDMs)")
    s.add_argument("--negative", default="")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--guidance", type=float, default=7.5)
    s.add_argument("--height", type=int)
    s.add_argument("--width", type=int)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--seed", type=int, help="the noise's seed; -1 or none: a random one (printed)")
    s.add_argument("--latents", type=Path, help=".npy of shape [B, C, H/f, W/f]: the initial noise")
    s.add_argument("--sampler", default="DDIM",
                   help="DDIM (default), DDPM, Euler, Euler a, DPM++ 2M, DPM++ 2M Karras, DPM++ 2M SDE, "
                        "DPM++ 2M SDE Karras, LCM (case-insensitive; the web UI's and k-diffusion's names)")
    s.add_argument("--schedule", metavar="{uniform,trailing,karras}",
                   help="uniform (the model's timestep spacing), trailing, karras (Euler, Euler a, DPM++); "
                        "default: what the sampler's name and the model's scheduler config say")
    s.add_argument("--noise", type=Path, metavar="FILE.npy",
                   help="the stochastic samplers' per-step noise, [steps, B, C, H/f, W/f] (default: from --seed)")
    s.add_argument("--cfg-cutoff", type=float, metavar="F",
                   help="after this fraction of the steps, run without the unconditional half (half the UNet work)")
    s.add_argument("--image", type=Path, help="input image: image to image, inpainting with --mask, or the "
                                              "low-resolution image of a super-resolution export (output: its "
                                              "size x the VAE factor)")
    s.add_argument("--noise-level", type=int, metavar="N",
                   help="upscaler: noise added to --image, 0..the model's max_noise_level (default 20)")
    s.add_argument("--image-noise", type=Path, metavar="FILE.npy",
                   help="upscaler: that noise, [1, 3, h, w] of the low-resolution image (default: from --seed)")
    s.add_argument("--class-label", type=int, metavar="N",
                   help="class-conditional UNets: the class (guidance against the null class where the model has one)")
    s.add_argument("--mask", type=Path, help="inpainting mask, the image's size: white = repaint")
    s.add_argument("--strength", type=float,
                   help="0 < S <= 1: share of the steps run on the noised image (default 0.75; inpainting 1.0)")
    s.add_argument("--resize", action="store_true",
                   help="resize an image whose size is not a multiple of the VAE factor (8 on SD) down to one "
                        "(else refused)")
    s.add_argument("--clip-skip", type=int, default=1,
                   help="text encoder layer to condition on, counted from the last: 1 = last (default), 2 = penultimate")
    s.add_argument("--prompt-syntax", choices=("webui", "plain"), default="webui",
                   help="webui: (word:1.2) emphasis, [less], BREAK (default); plain: brackets read literally, as diffusers")
    s.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="textual-inversion embedding (.safetensors, .bin, .pt); repeatable")
    s.add_argument("--vae-batch", type=int, metavar="N",
                   help="decode N images at a time (default: the whole batch, or what fits the free GPU memory)")
    s.add_argument("--control", action="append", default=[], metavar="IMAGE[:SCALE[:START:END]]",
                   help="a ControlNet's conditioning image, scale (default 1) and step window (shares of the "
                        "steps, default 0:1); one per exported ControlNet, in export order")
    s.add_argument("--control-preprocess", metavar="canny[:LOW:HIGH]",
                   help="make edge maps of the --control images first (OpenCV's Canny, thresholds default 100:200; "
                        "pip install 'sdrt[canny]')")
    s.add_argument("--guess-mode", action="store_true",
                   help="diffusers' guess mode: the ControlNets steer the conditional half of guidance only, "
                        "their residuals weighted 0.1 (shallow) to 1 (deep)")
    s.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA .safetensors (diffusers/PEFT or kohya keys), scale default 1; repeatable. "
                        "Merged at run time: no re-export, no rebuild (TensorRT: engines built with --refit)")
    # checked by open_backend, so a wrong name is one line like every other mistake
    s.add_argument("--backend", default="auto",
                   help="auto, tensorrt, tensorrt-rtx, onnxruntime-cuda or onnxruntime-cpu")


# GenerateRequest fields whose flag is not "--" + the field with dashes
FLAGS = {"prompt": "PROMPT", "embeddings": "--embedding", "loras": "--lora"}


def cli_message(e: UserError) -> str:
    """A request error names a field (sdrt.engine.request.RequestError): write it as its flag."""
    from sdrt.engine.request import RequestError
    if not isinstance(e, RequestError):
        return str(e)
    return e.render(lambda field: FLAGS.get(field, "--" + field.replace("_", "-")))


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"sdrt: warning: {message}\n"


def main(argv=None) -> int:
    import warnings
    warnings.formatwarning = one_line_warning
    args = parser().parse_args(argv)
    try:
        status = args.fn(args)             # commands return None (0) or their exit status
    except UserError as e:
        print(f"sdrt {args.cmd}: error: {cli_message(e)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:       # a module that an extra installs: name the extra
        if (err := missing(e)) is None:
            raise
        print(f"sdrt {args.cmd}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sdrt {args.cmd}: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
