"""The web UI's API subset its clients use: txt2img, img2img (init_images, mask,
denoising_strength), progress (per task id: force_task_id is the job's id), interrupt (scoped to a
task id when one is given), samplers, schedulers, sd-models, options.

Requests accept every field of the web UI's request models (and unknown ones, as its clients send
extension fields). A field that would change the image and that sdrt does not apply is named in
the response's info (`sdrt_not_applied`); one that cannot be honoured at all (a script, several
different init images, another checkpoint) is refused with a 400 naming it."""
from __future__ import annotations

import json
import re
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from sdrt.serve import spec as sp
from sdrt.serve.app import job_error, server_of, wait_done

router = APIRouter(prefix="/sdapi/v1", tags=["webui"])
TASK_ID = re.compile(r"^[A-Za-z0-9_.():-]{1,96}$")


class Processing(BaseModel):
    """The fields txt2img and img2img share (the web UI's StableDiffusionProcessing)."""
    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    distilled_cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict | None = None
    script_name: str | None = None
    script_args: list = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict = {}
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2Img(Processing):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_additional_modules: list | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_cfg: float | None = None
    hr_distilled_cfg: float | None = None


class Img2Img(Processing):
    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


def not_applied(req: Processing, has_mask: bool = False) -> list[str]:
    """Fields given with a value that would change the image, which sdrt does not apply."""
    out = []
    checks = {
        "styles": bool(req.styles), "subseed_strength": bool(req.subseed_strength),
        "seed_resize_from_h": req.seed_resize_from_h > 0, "seed_resize_from_w": req.seed_resize_from_w > 0,
"distilled_cfg_scale": req.distilled_cfg_scale is not None,
        "restore_faces": bool(req.restore_faces), "tiling": bool(req.tiling), "eta": bool(req.eta),
        "s_min_uncond": bool(req.s_min_uncond), "s_churn": bool(req.s_churn), "s_tmin": bool(req.s_tmin),
        "s_tmax": req.s_tmax not in (None, 0, float("inf")), "s_noise": req.s_noise not in (None, 1, 1.0),
        "refiner_checkpoint": bool(req.refiner_checkpoint), "firstpass_image": bool(req.firstpass_image),
        "infotext": bool(req.infotext),
    }
    if isinstance(req, Txt2Img):
        checks["enable_hr"] = req.enable_hr
        checks["firstphase_width"] = bool(req.firstphase_width)
        checks["firstphase_height"] = bool(req.firstphase_height)
    if isinstance(req, Img2Img):
        checks.update({"resize_mode": req.resize_mode != 0, "image_cfg_scale": req.image_cfg_scale is not None,
                       "initial_noise_multiplier": req.initial_noise_multiplier not in (None, 1, 1.0),
                       "latent_mask": req.latent_mask is not None, "include_init_images": req.include_init_images})
        if has_mask:
            checks.update({"mask_blur": (req.mask_blur if req.mask_blur is not None else
                                         max(req.mask_blur_x, req.mask_blur_y)) > 0,
                           "inpainting_fill": req.inpainting_fill != 1, "inpaint_full_res": req.inpaint_full_res})
    out += [k for k, v in checks.items() if v]
    out += [f"alwayson_scripts.{k}" for k in (req.alwayson_scripts or {}) if k != "controlnet"]
    out += [k for k in (req.model_extra or {})]
    return out


def settings(server, req: Processing) -> tuple[int | None, list[str]]:
    """override_settings: CLIP_stop_at_last_layers is clip skip; sd_model_checkpoint must be this
    model; the rest are named as not applied."""
    clip_skip, ignored = None, []
    for key, value in (req.override_settings or {}).items():
        if key == "CLIP_stop_at_last_layers":
            clip_skip = value
        elif key == "sd_model_checkpoint":
            check_checkpoint(server, value, f"override_settings.{key}")
        else:
            ignored.append(f"override_settings.{key}")
    return clip_skip, ignored


def check_checkpoint(server, value, field: str) -> None:
    if value not in (None, "", server.limits.model):
        raise sp.bad(field, f"{value!r} is not loaded: this server runs {server.limits.model!r} (GET /sdapi/v1/sd-models)")


def common(server, req: Processing, image=None, mask=None, strength=None, extra_not_applied=()) -> sp.Spec:
    if req.script_name:
        raise sp.bad("script_name", f"{req.script_name!r}: scripts are not available on this server")
    if req.force_task_id is not None and not TASK_ID.match(req.force_task_id):
        raise sp.bad("force_task_id", "use 1-96 letters, digits and _ . ( ) : -")
    clip_skip, ignored = settings(server, req)
    control, cn_ignored, guess_mode = controlnet_units(server, req)
    sampler = req.sampler_name if req.sampler_name else (req.sampler_index if "sampler_index" in req.model_fields_set
                                                         else None)
    field = "sampler_name" if req.sampler_name else "sampler_index"
    if req.batch_size < 1 or req.n_iter < 1:
        raise sp.bad("batch_size" if req.batch_size < 1 else "n_iter", "must be at least 1")
    n = req.batch_size * req.n_iter
    if n > server.limits.max_batch:
        raise sp.bad("batch_size", f"batch_size x n_iter = {n} images, over this server's {server.limits.max_batch}")
    return sp.make(server.limits, prompt=req.prompt, negative=req.negative_prompt, steps=req.steps,
                   guidance=req.cfg_scale, width=None if image is not None else req.width,
                   height=None if image is not None else req.height, n=n, seed=req.seed, sampler_name=sampler,
                   schedule=req.scheduler, clip_skip=clip_skip, image=image, mask=mask, strength=strength,
                   not_applied=not_applied(req, mask is not None) + ignored + cn_ignored + list(extra_not_applied),
                   control=control, guess_mode=guess_mode,
                   fields={"guidance": "cfg_scale", "n": "batch_size", "sampler": field, "schedule": "scheduler",
                           "clip_skip": "override_settings.CLIP_stop_at_last_layers",
                           "strength": "denoising_strength"})


CN = "alwayson_scripts.controlnet.args"
CN_MODULES = {"none": None, "canny": "canny"}


def controlnet_units(server, req: Processing) -> tuple[tuple, list[str], bool]:
    """The ControlNet extension's units (alwayson_scripts.controlnet.args: image or input_image as
    base64, module none/canny with threshold_a/threshold_b, weight, guidance_start, guidance_end)
    -> (spec.ControlUnit per exported ControlNet, in export order; fields not applied; guess mode:
    the units' guess_mode, which must agree). Disabled units are left out; `model` is not read:
    unit k runs on the export's ControlNet k."""
    script = (req.alwayson_scripts or {}).get("controlnet")
    if script is None:
        return (), [], False
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise sp.bad(CN, "must be a list of ControlNet units ({image, module, weight, guidance_start, guidance_end})")
    units, ignored, guess = [], [], set()
    for i, u in enumerate(args):
        where = f"{CN}[{i}]"
        if not isinstance(u, dict):
            raise sp.bad(where, "must be an object (a ControlNet unit: image, module, weight, ...)")
        if u.get("enabled", True) is False:
            continue
        key = "image" if u.get("image") is not None else "input_image"
        image = u.get(key)
        if isinstance(image, dict):            # {"image": base64, "mask": base64}
            if image.get("mask"):
                ignored.append(f"{where}.{key}.mask")
            image, key = image.get("image"), key + ".image"
        module = u.get("module") or "none"
        if module not in CN_MODULES:
            raise sp.bad(f"{where}.module", f"{module!r} is not available here: use none (a ready control image) "
                                            f"or canny")
        canny = None
        if module == "canny":
            from sdrt.engine.image_input import CANNY
            canny = tuple(d if u.get(k) in (None, -1) else u.get(k) for k, d in zip(("threshold_a", "threshold_b"), CANNY))
        changes = {"control_mode": u.get("control_mode") not in (None, 0, "Balanced"),
                   "resize_mode": u.get("resize_mode") not in (None, 0, "Just Resize"),
                   "pixel_perfect": bool(u.get("pixel_perfect")),
                   "processor_res": module != "none" and u.get("processor_res") not in (None, -1)}
        ignored += [f"{where}.{k}" for k, v in changes.items() if v]
        guess.add(bool(u.get("guess_mode")))
        units.append({"image": image, "scale": u.get("weight"), "start": u.get("guidance_start"),
                      "end": u.get("guidance_end"), "canny": canny,
                      "fields": {"image": key, "scale": "weight", "start": "guidance_start", "end": "guidance_end",
                                 "preprocess": "threshold_a"}})
    if len(guess) > 1:
        raise sp.bad(f"{CN}[0].guess_mode", "guess mode applies to every unit here: give the same guess_mode in each")
    return sp.control_units(server.limits, units, CN), ignored, guess == {True}


def info_json(server, req: Processing, job, spec: sp.Spec) -> str:
    """The response's `info`: a JSON string, in the web UI's keys."""
    n = spec.n
    text = lambda seed: (f"{spec.prompt}\nNegative prompt: {spec.negative}\nSteps: {spec.steps}, Sampler: "
                         f"{spec.sampler}, CFG scale: {spec.guidance:g}, Seed: {seed}, Size: {spec.width}x"
                         f"{spec.height}, Model: {server.limits.model}, Clip skip: {spec.clip_skip}")
    return json.dumps({
        "prompt": spec.prompt, "all_prompts": [spec.prompt] * n, "negative_prompt": spec.negative,
        "all_negative_prompts": [spec.negative] * n, "seed": spec.seeds[0], "all_seeds": list(spec.seeds),
        "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0, "width": spec.width,
        "height": spec.height, "sampler_name": spec.sampler, "cfg_scale": spec.guidance, "steps": spec.steps,
        "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": server.limits.model, "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": spec.strength,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": [text(s) for s in spec.seeds],
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_unix)),
        "clip_skip": spec.clip_skip, "is_using_inpainting_conditioning": spec.task == "inpaint",
        "version": "sdrt", "task_id": job.id, "interrupted": job.state == "cancelled",
        "sdrt_not_applied": list(spec.not_applied), "sdrt": job.info})


async def answer(request: Request, req: Processing, spec: sp.Spec) -> dict:
    server = server_of(request)
    job = server.scheduler.submit(spec, req.force_task_id)
    await wait_done(request, server.scheduler, job)
    if job.state == "failed":
        raise job_error(job)
    images = await sp.pngs_base64(job.images) if job.state == "succeeded" and req.send_images else []
    job.images = None
    return {"images": images, "parameters": req.model_dump(mode="json"), "info": info_json(server, req, job, spec)}


@router.post("/txt2img")
async def txt2img(req: Txt2Img, request: Request):
    server = server_of(request)
    return await answer(request, req, common(server, req))


@router.post("/img2img")
async def img2img(req: Img2Img, request: Request):
    server = server_of(request)
    return await answer(request, req, await run_in_threadpool(img2img_spec, server, req))


def img2img_spec(server, req: Img2Img) -> sp.Spec:
    """The images decoded and checked (off the event loop)."""
    lim = server.limits
    if not req.init_images:
        raise sp.bad("init_images", "give one base64 image to start from")
    if len(set(req.init_images)) > 1:
        raise sp.bad("init_images", "one init image per request here (the same image is used for every sample)")
    given = "width" in req.model_fields_set or "height" in req.model_fields_set
    img = sp.open_image(lim, "init_images[0]", sp.decode_base64("init_images[0]", req.init_images[0]))
    img = sp.fit(lim, img, "init_images[0]", *((req.width or img.width, req.height or img.height) if given
                                                else (None, None)))
    mask = None
    if req.mask:
        mask = sp.binary_mask(sp.open_image(lim, "mask", sp.decode_base64("mask", req.mask)),
                              invert=bool(req.inpainting_mask_invert))
        mask = mask.resize(img.size) if mask.size != img.size else mask
    strength = 0.75 if req.denoising_strength is None else req.denoising_strength
    return common(server, req, image=img.convert("RGB"), mask=mask, strength=strength)


@router.get("/progress")
async def progress(request: Request, id_task: str | None = None, task_id: str | None = None,
                   skip_current_image: bool = False):
    """A task's progress (id_task / task_id: the force_task_id it was sent with); without one, the
    first running job's."""
    sched = server_of(request).scheduler
    wanted = id_task or task_id
    if wanted is None:
        running = sched.running_ids()
        if not running:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state_of(None, None), "current_image": None,
                    "textinfo": None}
        wanted = running[0]
    job = sched.get(wanted)
    st = sched.status(job)
    frac = 1.0 if job.state == "succeeded" else st["step"] / max(1, st["steps"])
    return {"progress": round(frac, 4), "eta_relative": st["eta_s"] or 0.0, "state": state_of(job, st),
            "current_image": None, "textinfo": f"{job.state}: step {st['step']}/{st['steps']}"}


def state_of(job, st) -> dict:
    if job is None:
        return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    return {"skipped": False, "interrupted": job.state == "cancelled", "stopping_generation": False,
            "job": job.id, "job_count": 1, "job_no": 0 if not job.done else 1,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_unix)),
            "sampling_step": st["step"], "sampling_steps": st["steps"], "state": st["state"],
            "queue_position": st["queue_position"]}


class InterruptRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    id_task: str | None = None
    task_id: str | None = None


@router.post("/interrupt")
async def interrupt(request: Request, id_task: str | None = None, task_id: str | None = None,
                    body: InterruptRequest | None = None):
    """Stop the task given (query or JSON id_task/task_id) at its next step; with no task id, the
    running jobs (as the web UI does)."""
    sched = server_of(request).scheduler
    wanted = id_task or task_id or (body.id_task or body.task_id if body else None)
    ids = [wanted] if wanted else sched.running_ids()
    for job_id in ids:
        sched.cancel(sched.get(job_id), "interrupted", "interrupt")
    return {"interrupted": ids}


@router.get("/samplers")
async def samplers():
    return [{"name": name, "aliases": [name.lower()], "options": {}} for name in sp.SAMPLER_NAMES]


@router.get("/schedulers")
async def schedulers():
    auto = {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}
    return [auto] + [{"name": s, "label": s.capitalize(), "aliases": None, "default_rho": 7.0 if s == "karras" else -1,
                      "need_inner_model": False} for s in sp.SCHEDULES]


@router.get("/sd-models")
async def sd_models(request: Request):
    server = server_of(request)
    return [{"title": server.limits.model, "model_name": server.limits.model, "hash": None, "sha256": None,
             "filename": str(server.work_dir), "config": None}]


@router.get("/options")
async def get_options(request: Request):
    server = server_of(request)
    return {"sd_model_checkpoint": server.limits.model, "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0,
            "samples_format": "png", "sd_checkpoint_hash": None}


@router.post("/options")
async def set_options(options: dict[str, Any], request: Request):
    """Options are fixed when the server starts (they would change every client's images): a value
    equal to the current one is accepted, another is refused naming it."""
    current = await get_options(request)
    for key, value in options.items():
        if key == "sd_model_checkpoint":
            check_checkpoint(server_of(request), value, key)
        elif key not in current or current[key] != value:
            raise sp.bad(key, "server options are fixed at start: send it per request in override_settings "
                              "(CLIP_stop_at_last_layers) or leave it")
    return None
