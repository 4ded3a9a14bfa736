"""`sdrt serve`: the limits from the export, the scheduler, the engine worker, the app, and
uvicorn with a SIGTERM that drains (stop accepting: 503; running jobs finish; exit 0)."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from sdrt import manifest as mf
from sdrt.errors import UserError

log = logging.getLogger("sdrt.serve")
MAX_STEPS = 150              # per request (the engine's step table takes up to 1000)
MAX_SIDE = 2048
MAX_PIXELS = 1024 * 1024
DRAIN_GRACE_S = 10.0         # after the last job: time for its waiting responses to go out


def check_deps() -> None:
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client", "multipart") if not importable(m)]
    if missing:
        raise UserError(f"sdrt serve needs {', '.join(missing)}: pip install 'sdrt[serve]'")


def importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def make_limits(work_dir: Path, max_batch: int, loras: dict, embeddings: list, backend: str = "auto"):
    """The server's limits from the export's manifest (read only: the worker opens the Pipeline);
    on TensorRT, within the built engines' profile."""
    from sdrt.engine import backends
    from sdrt.engine import scheduler as ddim
    from sdrt.serve.spec import Limits
    manifest = mf.load(work_dir)
    cfg = mf.config(manifest)
    sched = ddim.DDIMConfig.from_json(work_dir / "scheduler" / "scheduler_config.json")
    min_size, max_size, max_pixels = cfg.vae_factor, MAX_SIDE, MAX_PIXELS
    name = backends.pick_auto(manifest) if backend == "auto" else backend
    profile = engine_profile(manifest, name, cfg.vae_factor)
    if profile is not None:
        if max_batch > profile["batch"]:
            raise UserError(f"--max-batch {max_batch}: the {name} engines take batches up to {profile['batch']}: "
                            f"give --max-batch {profile['batch']}, or build with --dynamic batch=1:1:{max_batch}")
        min_size, max_size = profile["min_size"], profile["max_size"]
        max_pixels = min(max_pixels, max_size * max_size)
    return Limits(model=work_dir.name, default_width=cfg.default_width, default_height=cfg.default_height,
                  multiple=cfg.vae_factor, min_size=min_size, max_size=max_size, max_pixels=max_pixels,
                  max_batch=max_batch, max_steps=min(MAX_STEPS, sched.num_train_timesteps),
                  clip_skip_max=cfg.text_layers, loras=loras, embeddings=tuple(t for _, t in embeddings),
                  inpainting_unet=cfg.inpainting_unet,
                  max_noise_level=manifest["upscaler"]["max_noise_level"] if cfg.upscaler else None)


def engine_profile(manifest: dict, backend: str, vae_factor: int) -> dict | None:
    """{"batch", "min_size", "max_size"} every built step engine of `backend` takes (its
    latents' profile; sides in pixels, the same range for height and width), or None when none is
    built (ONNX Runtime takes any shape)."""
    engines = manifest.get("engines", {}).get(backend, {})
    latents = [e["key"]["profile"]["latents"] for name, e in engines.items()
               if name.startswith("denoise_step") and "latents" in e.get("key", {}).get("profile", {})]
    if not latents:
        return None
    return {"batch": min(p["max"][0] for p in latents),
            "min_size": max(max(p["min"][2], p["min"][3]) for p in latents) * vae_factor,
            "max_size": min(min(p["max"][2], p["max"][3]) for p in latents) * vae_factor}


def build(work_dir: Path, backend: str = "auto", max_batch: int = 4, max_queue: int = 64,
          timeout: float | None = None, api_key: str | None = None, batching: str = "request",
          lora_dir: Path | None = None, embedding_dir: Path | None = None, warmup: bool = True,
          max_body_mb: float = 32, scheduler_type=None, metrics=None):
    """(ASGI app, Server): everything but the listening socket. scheduler_type, metrics: a
    Scheduler subclass and a Metrics object instead of the plain ones (the Ray Serve replicas'
    shared job registry and replica-labelled metrics: ray_app.py)."""
    from sdrt.serve import spec as sp
    from sdrt.serve.app import Server, create_app
    from sdrt.serve.metrics import Metrics
    from sdrt.serve.scheduler import POLICIES, Scheduler
    from sdrt.serve.worker import EngineWorker
    from sdrt.engine.backends import NAMES
    if backend != "auto" and backend not in NAMES:
        raise UserError(f"unknown backend {backend!r}: choose auto or one of {', '.join(NAMES)}")
    if batching not in POLICIES:
        raise UserError(f"--batching {batching}: use one of {', '.join(POLICIES)}")
    if max_batch < 1 or max_queue < 1:
        raise UserError("--max-batch and --max-queue must be at least 1")
    if timeout is not None and timeout <= 0:
        raise UserError(f"--timeout {timeout}: give a positive number of seconds")
    for flag, d in (("--lora-dir", lora_dir), ("--embedding-dir", embedding_dir)):
        if d is not None and not Path(d).is_dir():
            raise UserError(f"{flag} {d} is not a folder")
    loras, embeddings = sp.lora_files(lora_dir), sp.embedding_files(embedding_dir)
    if max_body_mb <= 0:
        raise UserError(f"--max-body-mb {max_body_mb}: give a positive size")
    limits = replace(make_limits(work_dir, max_batch, loras, embeddings, backend),
                     max_body_bytes=int(max_body_mb * 2**20))
    metrics = metrics or Metrics()
    scheduler = (scheduler_type or Scheduler)(batching, max_batch, max_queue, timeout, metrics)

    def open_pipeline():
        from sdrt.engine.pipeline import Pipeline
        return Pipeline(work_dir, backend=backend, embeddings=embeddings)
    worker = EngineWorker(open_pipeline, scheduler, loras, metrics, warmup=warmup)
    server = Server(scheduler, limits, metrics, worker, api_key=api_key, work_dir=work_dir)
    return create_app(server), server


def serve(work_dir: Path | None = None, host: str = "127.0.0.1", port: int = 7860, backend: str = "auto",
          max_batch: int = 4, max_queue: int = 64, timeout: float | None = None, api_key: str | None = None,
          batching: str = "request", lora_dir: Path | None = None, embedding_dir: Path | None = None,
          max_body_mb: float = 32) -> int:
    check_deps()
    import uvicorn
    if work_dir is None:
        from sdrt.demo import demo_export
        work_dir = demo_export(Path("sdrt-demo"))
    work_dir = Path(work_dir)
    api_key = api_key or os.environ.get("SDRT_API_KEY") or None
    app, server = build(work_dir, backend, max_batch, max_queue, timeout, api_key, batching, lora_dir,
                        embedding_dir, max_body_mb=max_body_mb)
    logging.basicConfig(level=logging.INFO, format="sdrt serve: %(message)s", stream=sys.stderr)
    server.worker.start()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=DRAIN_GRACE_S)
    uv = DrainingServer(config, server)
    threading.Thread(target=stop_if_engine_fails, args=(server, uv), daemon=True).start()
    print(f"sdrt serve: {work_dir} on http://{host}:{port} (batching {batching}, max batch {max_batch}, "
          f"queue {max_queue}{', API key required' if api_key else ''}); docs at /docs", file=sys.stderr, flush=True)
    uv.run()
    server.scheduler.stop()
    server.worker.join(timeout=5)
    if server.worker.load_error:
        raise UserError(f"the engine did not start: {server.worker.load_error}")
    if not uv.started:
        raise UserError(f"cannot listen on {host}:{port} (see the line above): choose another --port or --host")
    return 0


def stop_if_engine_fails(server, uv) -> None:
    """The engine could not be opened (a backend missing, a stale engine...): stop serving, so the
    command ends with that one line instead of a server that can never run a job."""
    while not server.worker.ready.wait(0.2):
        if server.worker.load_error:
            uv.should_exit = True
            return


def drain(server, uv) -> None:
    """SIGTERM: refuse new jobs (503), let the running ones finish, then stop uvicorn."""
    server.scheduler.drain()
    while not server.scheduler.idle():
        time.sleep(0.05)
    deadline = time.monotonic() + DRAIN_GRACE_S    # the finished jobs' responses go out
    while server.inflight > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    uv.should_exit = True


class DrainingServer:
    """uvicorn.Server whose SIGTERM drains first (SIGINT: as uvicorn)."""

    def __new__(cls, config, server):
        import uvicorn

        class Drain(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if sig == signal.SIGTERM:
                    if not getattr(self, "draining", False):
                        self.draining = True
                        print("sdrt serve: SIGTERM: finishing running jobs, refusing new ones", file=sys.stderr,
                              flush=True)
                        threading.Thread(target=drain, args=(server, self), daemon=True).start()
                    return
                super().handle_exit(sig, frame)
        return Drain(config)
