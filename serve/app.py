"""The FastAPI application: routes of the native jobs API, the OpenAI images API and the web UI's
API (api_*.py), health/readiness/metrics here; authentication, the body size limit and request
metrics as one ASGI layer (Guard) around it."""
from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdrt.serve.jobs import Job, wait_change
from sdrt.serve.metrics import Metrics
from sdrt.serve.scheduler import Scheduler
from sdrt.serve.spec import ApiError, Limits

log = logging.getLogger("sdrt.serve")
OPEN_PATHS = ("/health",)         # the only route without the API key


@dataclass
class Server:
    """What the routes share: the scheduler (never the Pipeline), limits, metrics, the worker's
    readiness."""
    scheduler: Scheduler
    limits: Limits
    metrics: Metrics
    worker: object                 # EngineWorker: .ready, .load_error, .backend_name
    api_key: str | None = None
    work_dir: Path | None = None
    inflight: int = 0              # HTTP requests being answered (SIGTERM waits for them)


def server_of(request: Request) -> Server:
    return request.app.state.sdrt


async def wait_done(request: Request, sched: Scheduler, job: Job, poll: float = 0.25) -> None:
    """Until the job is done; a client that goes away cancels it (at the next step)."""
    seen = -1
    while not job.done:
        seen = job.version
        await wait_change(job, seen, poll)
        if not job.done and await request.is_disconnected():
            sched.cancel(job, "the client disconnected", "disconnect")
            return


def job_error(job: Job) -> ApiError:
    """A finished job that has no images, as the error its blocking route answers."""
    if job.state == "failed":
        kind = "server_error" if (job.error_status or 500) >= 500 else "invalid_request_error"
        return ApiError(job.error_status or 500, job.error or "failed", kind=kind)
    return ApiError(job.error_status or 409, f"job {job.id} was cancelled: {job.error}", kind="cancelled")


def create_app(server: Server) -> FastAPI:
    from sdrt.serve import api_jobs, api_openai, api_webui
    app = FastAPI(title="sdrt", description="Stable Diffusion serving: native jobs API, OpenAI images API, "
                  "the web UI's API subset", version="1")
    app.state.sdrt = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        headers = {"Retry-After": str(server.scheduler.retry_after())} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "form")]
        field = ".".join(loc) or None
        message = f"{field}: {err.get('msg')}" if field else str(err.get("msg"))
        return JSONResponse(ApiError(422, message, field).body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.get("/health", tags=["server"])
    async def health():
        """Alive (the process answers)."""
        return {"status": "ok"}

    @app.get("/ready", tags=["server"])
    async def ready():
        """Engine loaded and warm, and accepting jobs."""
        w = server.worker
        if w.load_error:
            return JSONResponse({"ready": False, "error": w.load_error}, status_code=503)
        if not server.scheduler.accepting:
            return JSONResponse({"ready": False, "error": "shutting down"}, status_code=503)
        if not w.ready.is_set():
            return JSONResponse({"ready": False, "error": "loading the engine"}, status_code=503)
        return {"ready": True, "backend": w.backend_name, "model": server.limits.model}

    @app.get("/metrics", tags=["server"])
    async def metrics():
        server.metrics.queue_depth.set(server.scheduler.depth())
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(api_jobs.router)
    app.include_router(api_openai.router)
    app.include_router(api_webui.router)
    return Guard(app, server)


class Guard:
    """ASGI layer: API key (constant-time compare), body size limit (413), request metrics."""

    def __init__(self, app: FastAPI, server: Server):
        self.app, self.server = app, server
        self.fastapi = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]
        self.server.inflight += 1

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            if not self.authorized(scope):
                return await self.reply(send_counted, ApiError(401, "missing or wrong API key: send "
                                        "'Authorization: Bearer KEY'", kind="authentication_error"),
                                        {"www-authenticate": "Bearer"})
            body = await self.read_body(scope, receive)
            if body is None:
                limit = self.server.limits.max_body_bytes
                return await self.reply(send_counted, ApiError(413, f"the request body is over this server's "
                                        f"{limit} bytes", kind="request_too_large"))
            await self.app(scope, replay(body, receive), send_counted)
        finally:
            self.server.inflight -= 1
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.server.metrics.requests.labels(route=path, method=scope["method"], status=str(status[0])).inc()

    def authorized(self, scope) -> bool:
        key = self.server.api_key
        if not key or scope["path"] in OPEN_PATHS:
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())

    async def read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None when it is over the limit (checked on Content-Length first)."""
        limit = self.server.limits.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return None
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks)

    async def reply(self, send, e: ApiError, headers: dict | None = None):
        body = json.dumps(e.body()).encode()
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": e.status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})


def replay(body: bytes, receive):
    """A receive that gives the read body once, then the client's own messages (disconnects)."""
    sent = [False]

    async def receive_again():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return receive_again


