"""The engine worker: one thread that owns the Pipeline (backend, buffers, graphs, LoRA weights)
and runs the scheduler's batches. Nothing else touches the Pipeline."""
from __future__ import annotations

import logging
import threading
import time

from sdrt.engine.request import Cancelled, RequestError
from sdrt.errors import UserError, first_line
from sdrt.serve import runner
from sdrt.serve.jobs import Job
from sdrt.serve.scheduler import Scheduler

log = logging.getLogger("sdrt.serve")


class EngineWorker(threading.Thread):
    """open_pipeline: a callable returning the Pipeline, called in this thread. loras: {name: path}."""

    def __init__(self, open_pipeline, scheduler: Scheduler, loras: dict, metrics=None, warmup: bool = True):
        super().__init__(name="sdrt-engine", daemon=True)
        self.open_pipeline, self.scheduler, self.loras, self.metrics = open_pipeline, scheduler, loras, metrics
        self.warmup = warmup
        self.pipe = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.active_loras: tuple | None = ()      # None: unknown (a switch failed half-way)
        self.backend_name = ""

    def run(self) -> None:
        try:
            self.pipe = self.open_pipeline()
            self.backend_name = self.pipe.backend_name
            if self.warmup:          # sessions, buffers and graphs of the default shape, before /ready
                self.warm()
        except Exception as e:       # noqa: BLE001 (the reason goes to /ready and the log)
            self.load_error = first_line(e)
            self.scheduler.drain()
            return
        self.ready.set()
        while True:
            batch = self.scheduler.next_batch()
            if batch is None:
                return
            if batch:
                try:
                    self.run_batch(batch)
                except Exception as e:   # noqa: BLE001 (never lose the worker: fail the jobs, go on)
                    log.exception("serving fault")
                    for job in batch:
                        self.scheduler.fail(job, 500, f"server error: {first_line(e)}")
                    self.scheduler.batch_done(batch)

    def warm(self) -> None:
        """One step at the default size (an inpainting UNet: with a blank image and mask)."""
        cfg = self.pipe.config
        image = mask = None
        if cfg.inpainting_unet:
            from PIL import Image
            image = Image.new("RGB", (cfg.default_width, cfg.default_height))
            mask = Image.new("L", image.size, 255)
        runner.run(self.pipe, [runner.Sample("", "", 0)], 1, 5.0, cfg.default_height, cfg.default_width,
                   image=image, mask=mask)

    def run_batch(self, batch: list[Job]) -> None:
        """One engine call; a fault splits the batch so that only the faulty job fails."""
        groups = self.by_prompt_chunks(batch)
        if len(groups) > 1:
            for group in groups:
                self.run_batch(group)
            return
        try:
            self.call(batch)
        except Cancelled:            # every job of the call was cancelled or timed out
            pass
        except UserError as e:       # what the runtime checks itself (a prompt longer than the engines take...)
            self.split_or_fail(batch, 400, e.render(str) if isinstance(e, RequestError) else first_line(e))
        except Exception as e:      # noqa: BLE001 (an engine fault: logged, that job gets a 500)
            log.exception("engine fault on job(s) %s", ", ".join(j.id for j in batch))
            self.split_or_fail(batch, 500, f"engine error: {first_line(e)}")
        finally:
            self.scheduler.batch_done(batch)

    def by_prompt_chunks(self, batch: list[Job]) -> list[list[Job]]:
        """Jobs grouped by their text length in 77-token chunks: a call pads every prompt to its
        longest, so a short prompt beside a long one would not draw what it draws alone."""
        if len(batch) == 1:
            return [batch]
        cond = self.pipe.conditioning(self.pipe.embeddings)
        guided = batch[0].spec.guidance > 1.0
        groups: dict[int, list[Job]] = {}
        try:
            for job in batch:
                k = max(len(cond.chunks(job.spec.prompt)), len(cond.chunks(job.spec.negative)) if guided else 1)
                groups.setdefault(k, []).append(job)
        except Exception:            # noqa: BLE001 (the engine call reports a bad prompt, per job)
            return [batch]
        return list(groups.values())

    def split_or_fail(self, batch: list[Job], status: int, message: str) -> None:
        live = [j for j in batch if not j.done]
        if len(live) == 1:
            self.scheduler.fail(live[0], status, message)
            return
        for job in live:                         # alone, each: the others' images still come
            self.run_batch([job])

    def call(self, batch: list[Job]) -> None:
        batch = [j for j in batch if not j.done]       # cancelled since the scheduler handed them over
        if not batch:
            return
        spec = batch[0].spec
        self.switch_loras(spec.loras)
        samples = [runner.Sample(j.spec.prompt, j.spec.negative, seed) for j in batch for seed in j.spec.seeds]
        last = [time.perf_counter()]

        def on_step(done: int, total: int) -> None:
            now = time.perf_counter()
            live = self.scheduler.on_step(batch, done, now - last[0])
            last[0] = now
            if not live:
                raise Cancelled()

        t0 = time.perf_counter()
        result = runner.run(self.pipe, samples, spec.steps, spec.guidance, spec.height, spec.width,
                            clip_skip=spec.clip_skip, image=spec.image, mask=spec.mask, strength=spec.strength,
                            on_step=on_step)
        if self.metrics:
            self.metrics.batches.inc()
        t = result.timings
        info = {"backend": self.backend_name, "batch_images": len(samples), "batch_jobs": len(batch),
                "total_ms": round((time.perf_counter() - t0) * 1e3, 1),
                "denoise_ms": round(t["denoise_ms"], 1), "vae_ms": round(t["vae_ms"], 1),
                "setup_ms": round(t["setup_ms"], 1)}
        self.scheduler.batch_done([], decode_s=t["vae_ms"] / 1e3)
        i = 0
        for job in batch:
            images = list(result.images[i:i + job.spec.n])
            i += job.spec.n
            self.scheduler.succeed(job, images, {**job.spec.info(), **info})

    def switch_loras(self, loras: tuple) -> None:
        if loras == self.active_loras:
            return
        self.active_loras = self.scheduler.loaded_loras = None
        try:
            self.pipe.set_loras([(self.loras[name], scale) for name, scale in loras])
        except UserError as e:
            raise UserError(f"LoRA {', '.join(n for n, _ in loras)} cannot be applied: {e}") from None
        self.active_loras = self.scheduler.loaded_loras = loras
        if self.metrics:
            self.metrics.lora_switches.inc()
