"""The native jobs API: submit, status, result, events (SSE), cancel, and what the server takes.

    POST   /v1/jobs              -> 202 {id, state, queue_position}
    GET    /v1/jobs/{id}         -> {id, state, step, steps, queue_position, eta_s, error}
    GET    /v1/jobs/{id}/result  -> {id, images: [base64 PNG], seeds, info}   (409 until done)
    GET    /v1/jobs/{id}/events  -> text/event-stream: `progress` events, then one `done`
    DELETE /v1/jobs/{id}         -> the status after cancelling
    GET    /v1/info              -> model, sizes, max batch, steps, samplers, LoRAs, defaults"""
from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from sdrt.serve import spec as sp
from sdrt.serve.app import server_of
from sdrt.serve.jobs import wait_change
from sdrt.serve.spec import ApiError

router = APIRouter(tags=["jobs"])
KEEP_ALIVE_S = 15.0


class LoraChoice(BaseModel):
    name: str
    scale: float = 1.0


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    n: int = 1
    seed: int | None = Field(None, description="-1 or absent: random; image k uses seed + k")
    sampler: str | None = None
    schedule: str | None = None
    clip_skip: int | None = None
    loras: list[LoraChoice] = []
    image: str | None = Field(None, description="base64 image: image to image (or inpainting with mask)")
    mask: str | None = Field(None, description="base64 mask, white = repaint")
    strength: float | None = None
    noise_level: int | None = Field(None, description="x4 upscaler models: the low-resolution image's noise "
                                                       "level, 0..max (GET /v1/info), default 20")


def job_spec(server, req: JobRequest) -> sp.Spec:
    lim = server.limits
    image = mask = None
    if req.mask is not None and req.image is None:
        raise sp.bad("mask", "needs an image (inpainting repaints the white part of the mask in the image)")
    if req.image is not None:
        scale = lim.multiple if lim.upscaler else 1     # an upscaler's width/height are the output's
        w, h = (None if v is None else max(v // scale, 1) for v in (req.width, req.height))
        image = sp.fit(lim, sp.open_image(lim, "image", sp.decode_base64("image", req.image)), "image", w, h)
    if req.mask is not None:
        mask = sp.binary_mask(sp.open_image(lim, "mask", sp.decode_base64("mask", req.mask)))
        mask = mask.resize(image.size) if mask.size != image.size else mask
    return sp.make(lim, prompt=req.prompt, negative=req.negative_prompt, steps=req.steps,
                   guidance=req.guidance_scale, width=req.width, height=req.height, n=req.n, seed=req.seed,
                   sampler_name=req.sampler, schedule=req.schedule, clip_skip=req.clip_skip, lora_list=req.loras, image=image, mask=mask,
                   strength=req.strength, noise_level=req.noise_level, upscale_route=True)


@router.post("/v1/jobs", status_code=202)
async def submit_job(req: JobRequest, request: Request):
    """Queue a generation; poll its status, follow its events, fetch its result."""
    server = server_of(request)
    job = server.scheduler.submit(await run_in_threadpool(job_spec, server, req))   # images decode off the loop
    st = server.scheduler.status(job)
    return JSONResponse({"id": job.id, "state": st["state"], "queue_position": st["queue_position"]},
                        status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/v1/jobs/{job_id}")
async def job_status(job_id: str, request: Request):
    sched = server_of(request).scheduler
    return sched.status(sched.get(job_id))


@router.get("/v1/jobs/{job_id}/result")
async def job_result(job_id: str, request: Request):
    sched = server_of(request).scheduler
    job = sched.get(job_id)
    if not job.done:
        raise ApiError(409, f"job {job_id} is {job.state}: the result is ready when its state is succeeded", "id")
    if job.state != "succeeded":
        raise ApiError(409, f"job {job_id} {job.state}: {job.error}", "id")
    if job.images is None:
        raise ApiError(410, f"job {job_id}'s images are no longer kept (the newest results are): "
                       f"fetch results soon after the job succeeds", "id")
    return {"id": job.id, "images": await sp.pngs_base64(job.images), "seeds": list(job.spec.seeds),
            "info": job.info}


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request):
    """Server-Sent Events: `progress` (the status JSON) on every change, then `done` (final status)."""
    sched = server_of(request).scheduler
    job = sched.get(job_id)

    async def events():
        seen = -1
        while True:
            version = job.version
            st = sched.status(job)
            if job.done:
                yield sse("done", st)
                return
            if version != seen:
                seen = version
                yield sse("progress", st)
            await wait_change(job, seen, KEEP_ALIVE_S)
            if job.version == seen and not job.done:
                yield ": keep-alive\n\n"
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request):
    """Cancel: a queued job leaves the queue; a running one stops at the next step."""
    sched = server_of(request).scheduler
    job = sched.cancel(sched.get(job_id))
    return sched.status(job)


@router.get("/v1/info")
async def server_info(request: Request):
    server = server_of(request)
    return {**server.limits.info(), "backend": server.worker.backend_name,
            "batching": server.scheduler.policy, "max_queue": server.scheduler.max_queue,
            "timeout_s": server.scheduler.timeout, "batching_notes": BATCHING_NOTES[server.scheduler.policy]}


BATCHING_NOTES = {
    "none": "one job per engine call",
    "request": "queued jobs of equal size, steps, guidance, clip skip, sampler, schedule and LoRA set share one "
               "engine call",
    "step": "text-to-image jobs of equal size, guidance on/off and LoRA set share the running batch: they join "
            "between denoising steps and leave after their last step; each slot has its own sampler rows, so "
            "jobs of different deterministic samplers (DDIM, Euler, DPM++ 2M) share the slots; image inputs, "
            "stochastic samplers (DDPM, Euler a, DPM++ 2M SDE, LCM) and prompts over one 77-token chunk run "
            "per request, between steps"}
