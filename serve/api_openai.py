"""OpenAI's images API: POST /v1/images/generations (JSON) and POST /v1/images/edits (multipart
image + optional mask: image to image, or inpainting), answered with b64_json images. Works with
the official `openai` client (base_url http://HOST:PORT/v1); sdrt's own fields go in extra_body
(JSON) or as extra form fields: negative_prompt, steps, guidance_scale, seed, sampler, clip_skip,
loras, strength."""
from __future__ import annotations

import json

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from sdrt.errors import first_line
from sdrt.serve import spec as sp
from sdrt.serve.api_jobs import LoraChoice
from sdrt.serve.app import job_error, server_of, wait_done
from sdrt.serve.spec import ApiError

router = APIRouter(tags=["openai"])
IGNORED = ("quality", "style", "moderation", "output_compression")   # accepted, named in info when given


class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str
    model: str | None = None
    n: int | None = 1
    size: str | None = None
    response_format: str | None = "b64_json"
    user: str | None = None
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    moderation: str | None = None
    stream: bool | None = None
    partial_images: int | None = None
    negative_prompt: str = ""
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    sampler: str | None = None
    schedule: str | None = None
    clip_skip: int | None = None
    loras: list[LoraChoice] = []


def check_common(server, model, response_format, output_format, background, stream, extra: dict) -> list[str]:
    """Refuse what cannot be honoured; return the accepted fields that are not applied."""
    if response_format not in (None, "b64_json"):
        raise sp.bad("response_format", f"{response_format!r}: this server returns images inline only: use "
                     "response_format='b64_json'")
    if output_format not in (None, "png"):
        raise sp.bad("output_format", f"{output_format!r}: this server writes PNG")
    if background not in (None, "auto", "opaque"):
        raise sp.bad("background", f"{background!r}: this server draws opaque images")
    if stream:
        raise sp.bad("stream", "streamed partial images are not served here: poll /v1/jobs for progress")
    if model not in (None, "", server.limits.model, "sdrt"):
        raise sp.bad("model", f"{model!r} is not served here: this server runs {server.limits.model!r}")
    unknown = sorted(k for k in extra if k not in ("partial_images",))
    if unknown:
        raise sp.bad(unknown[0], "is not a field of this API")
    return [k for k, v in extra.items() if v is not None]


async def run_blocking(request: Request, spec: sp.Spec) -> dict:
    server = server_of(request)
    job = server.scheduler.submit(spec)
    await wait_done(request, server.scheduler, job)
    if job.state != "succeeded":
        raise job_error(job)
    data = [{"b64_json": b, "revised_prompt": spec.prompt} for b in await sp.pngs_base64(job.images)]
    job.images = None                           # delivered: keep only the status
    return {"created": int(job.created_unix), "data": data, "output_format": "png",
            "size": f"{spec.width}x{spec.height}", "info": job.info}


@router.post("/v1/images/generations")
async def generations(req: ImagesRequest, request: Request):
    """Text to image (OpenAI's images.generate)."""
    server = server_of(request)
    not_applied = check_common(server, req.model, req.response_format, req.output_format, req.background,
                               req.stream, req.model_extra or {})
    not_applied += [k for k in IGNORED if getattr(req, k) is not None]
    wh = sp.parse_size(server.limits, req.size)
    w, h = wh if wh else (None, None)
    spec = sp.make(server.limits, prompt=req.prompt, negative=req.negative_prompt, steps=req.steps,
                   guidance=req.guidance_scale, width=w, height=h, n=req.n, seed=req.seed,
                   sampler_name=req.sampler, schedule=req.schedule, clip_skip=req.clip_skip, lora_list=req.loras,
                   not_applied=not_applied, fields={"width": "size", "height": "size"})
    return await run_blocking(request, spec)


EDIT_FIELDS = {"prompt", "model", "n", "size", "response_format", "user", "quality", "background",
               "output_format", "output_compression", "input_fidelity", "stream", "partial_images",
               "negative_prompt", "steps", "guidance_scale", "seed", "sampler", "schedule", "clip_skip", "loras", "strength"}


@router.post("/v1/images/edits")
async def edits(request: Request):
    """Image to image, or inpainting with a mask (multipart: image, mask, prompt, ...). The mask's
    transparent part is repainted (OpenAI's convention); an opaque mask: its white part. With no
    mask, a transparent part of the image is repainted; an opaque image: image to image."""
    server = server_of(request)
    lim = server.limits
    try:
        form = await request.form(max_files=4, max_fields=64, max_part_size=lim.max_body_bytes)
    except Exception as e:                       # noqa: BLE001 (a malformed multipart body)
        raise ApiError(400, f"the body is not a valid multipart form ({first_line(e)}): send image, "
                       f"prompt, ... as multipart/form-data") from None
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    files = {k: v for k, v in form.multi_items() if not isinstance(v, str)}
    images = [v for k, v in form.multi_items() if k in ("image", "image[]") and not isinstance(v, str)]
    unknown = sorted(k for k in fields if k not in EDIT_FIELDS)
    if unknown:
        raise sp.bad(unknown[0], "is not a field of this API")
    if not images:
        raise sp.bad("image", "is missing: send the image to edit as a file part named image")
    if len(images) > 1:
        raise sp.bad("image", "one image per request here")
    if "prompt" not in fields:
        raise sp.bad("prompt", "is missing")
    get = fields.get
    not_applied = check_common(server, get("model"), get("response_format"), get("output_format"),
                               get("background"), get("stream") in ("true", "True", "1"), {})
    not_applied += [k for k in ("quality", "output_compression", "input_fidelity") if k in fields]
    image_bytes = await images[0].read()
    mask_bytes = await files["mask"].read() if "mask" in files else None
    img, mask = await run_in_threadpool(edit_inputs, lim, image_bytes, mask_bytes, get("size"))
    spec = sp.make(lim, prompt=get("prompt"), negative=get("negative_prompt"),
                   steps=form_number("steps", get("steps"), int), guidance=form_number("guidance_scale",
                   get("guidance_scale"), float), n=form_number("n", get("n"), int),
                   seed=form_number("seed", get("seed"), int), sampler_name=get("sampler"), schedule=get("schedule"),
                   clip_skip=form_number("clip_skip", get("clip_skip"), int),
                   lora_list=form_json("loras", get("loras")), image=img.convert("RGB"), mask=mask,
                   strength=form_number("strength", get("strength"), float), not_applied=not_applied,
                   fields={"width": "size", "height": "size"})
    return await run_blocking(request, spec)


def edit_inputs(lim, image_bytes: bytes, mask_bytes: bytes | None, size):
    """(image at the asked size, repaint mask or None), decoded off the event loop."""
    img = sp.open_image(lim, "image", image_bytes)
    mask = sp.binary_mask(sp.open_image(lim, "mask", mask_bytes)) if mask_bytes is not None else sp.alpha_mask(img)
    wh = sp.parse_size(lim, size)
    img = sp.fit(lim, img, "image", *(wh or (None, None)))
    if mask is not None and mask.size != img.size:
        mask = mask.resize(img.size)
    return img, mask


def form_number(field: str, v, kind):
    if v is None or v == "":
        return None
    try:
        return kind(v)
    except ValueError:
        raise sp.bad(field, f"{v!r} is not {'an integer' if kind is int else 'a number'}") from None


def form_json(field: str, v):
    """loras as a JSON list in a form field: '[{"name": "x", "scale": 0.8}]'."""
    if v is None or v == "":
        return None
    try:
        items = json.loads(v)
    except ValueError:
        raise sp.bad(field, 'is not JSON: give [{"name": ..., "scale": ...}]') from None
    if not isinstance(items, list):
        raise sp.bad(field, 'must be a JSON list: [{"name": ..., "scale": ...}]')
    return items
