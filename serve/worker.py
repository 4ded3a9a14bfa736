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
        self.slot_sets: dict = {}                 # --batching step: StepSlots per (height, width, guided)

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
                    if self.scheduler.policy == "step":
                        self.run_steps(batch)
                    else:
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
        if cfg.upscaler:                          # its low-resolution image
            from PIL import Image
            image = Image.new("RGB", (cfg.default_width // cfg.vae_factor, cfg.default_height // cfg.vae_factor))
        runner.run(self.pipe, [runner.Sample("", "", 0)], 1, 5.0, cfg.default_height, cfg.default_width,
                   image=image, mask=mask, noise_level=0 if cfg.upscaler else None)
        if self.scheduler.policy == "step" and not (cfg.inpainting_unet or cfg.upscaler):
            slots = self.slot_set(cfg.default_height, cfg.default_width, True)
            slots.advance()                       # every slot parked: one step on zeros

    # ---- --batching step -------------------------------------------------------------------------

    def slot_set(self, height: int, width: int, guided: bool):
        """The StepSlots of this shape at --max-batch slots (kept: one plan, its graphs)."""
        key = (height, width, guided)
        if key not in self.slot_sets:
            self.slot_sets[key] = self.pipe.step_slots(batch=self.scheduler.max_batch, height=height, width=width,
                                                       guidance=guided)
        return self.slot_sets[key]

    def run_steps(self, first: list[Job]) -> None:
        """Step-level batching: the jobs of one step key run in the slots; between steps, jobs
        join free slots (Scheduler.admit), progress is reported per job, cancelled or timed-out
        jobs leave (their slots are parked), finished ones are decoded and leave."""
        spec = first[0].spec
        key = self.scheduler.key(first[0])
        try:
            self.switch_loras(spec.loras)
        except UserError as e:
            for job in first:
                self.scheduler.fail(job, 400, first_line(e))
            self.scheduler.batch_done(first)
            return
        if spec.task != "txt2img":                # image inputs: one engine call per request
            for job in first:
                self.run_batch([job])
            return
        from sdrt.serve.step_batch import StepBatch
        batch = StepBatch(self.slot_set(spec.height, spec.width, spec.guidance > 1.0))
        try:
            self.step_loop(batch, key, first)
        except Exception as e:       # noqa: BLE001 (a serving fault: the jobs in the slots fail, not hang)
            for entry in list(batch.entries):
                batch.remove(entry)
                self.scheduler.fail(entry.job, 500, f"server error: {first_line(e)}")
                self.scheduler.batch_done([entry.job])
            raise

    def step_loop(self, batch, key: tuple, first: list[Job]) -> None:
        pending = first
        while True:
            for job in pending:
                self.take_slots(batch, job)
            if not batch.entries:
                return
            try:
                dt = batch.advance()
            except Exception as e:   # noqa: BLE001 (an engine fault: every job in the slots fails)
                log.exception("engine fault in the step slots")
                for entry in list(batch.entries):
                    batch.remove(entry)
                    self.scheduler.fail(entry.job, 500, f"engine error: {first_line(e)}")
                    self.scheduler.batch_done([entry.job])
                return
            live = self.scheduler.on_slots_step([(e.job, e.done) for e in batch.entries], dt, batch.occupied)
            for entry in [e for e in batch.entries if e.job not in live]:     # cancelled, timed out
                batch.remove(entry)
                self.scheduler.batch_done([entry.job])
            for entry in batch.finished():
                self.finish_job(batch, entry)
            pending = self.scheduler.admit(key, batch.free)

    def take_slots(self, batch, job: Job) -> None:
        """A running job into free slots (or, when it cannot take slots, one call of its own)."""
        if job.done:                              # cancelled since it was admitted
            self.scheduler.batch_done([job])
            return
        try:
            if batch.fits(job.spec) is not None:
                self.run_batch([job])
                return
            batch.place(job)
        except UserError as e:
            self.scheduler.fail(job, 400, e.render(str) if isinstance(e, RequestError) else first_line(e))
            self.scheduler.batch_done([job])
        except Exception as e:       # noqa: BLE001
            log.exception("engine fault on job %s", job.id)
            self.scheduler.fail(job, 500, f"engine error: {first_line(e)}")
            self.scheduler.batch_done([job])

    def finish_job(self, batch, entry) -> None:
        """A finished job: its VAE decode, its slots freed, its result."""
        job = entry.job
        try:
            images, decode_s = batch.images(entry)
        except Exception as e:       # noqa: BLE001
            log.exception("engine fault decoding job %s", job.id)
            batch.remove(entry)
            self.scheduler.fail(job, 500, f"engine error: {first_line(e)}")
            self.scheduler.batch_done([job])
            return
        batch.remove(entry)
        if self.metrics:
            self.metrics.batches.inc()
        info = {"backend": self.backend_name, "batching": "step", "slots": batch.slots.batch,
                "batch_images": round(entry.occupied / max(entry.done, 1), 2),   # mean occupied slots
                "batch_jobs": len({id(e) for e in batch.occupant if e is not None}) + 1,
                "total_ms": round((time.perf_counter() - entry.started) * 1e3, 1),
                "denoise_ms": round(entry.denoise_s * 1e3, 1), "vae_ms": round(decode_s * 1e3, 1), "setup_ms": 0.0}
        self.scheduler.succeed(job, list(images), {**job.spec.info(), **info})
        self.scheduler.batch_done([job], decode_s=decode_s)

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
            if self.metrics:
                self.metrics.step_batch.observe(len(samples))
            now = time.perf_counter()
            live = self.scheduler.on_step(batch, done, now - last[0])
            last[0] = now
            if not live:
                raise Cancelled()

        t0 = time.perf_counter()
        result = runner.run(self.pipe, samples, spec.steps, spec.guidance, spec.height, spec.width,
                            clip_skip=spec.clip_skip, image=spec.image, mask=spec.mask, strength=spec.strength,
                            sampler=spec.sampler, schedule=spec.schedule, on_step=on_step,
                            noise_level=spec.noise_level)
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
        self.slot_sets.clear()                    # their plans follow the old weights
        try:
            self.pipe.set_loras([(self.loras[name], scale) for name, scale in loras])
        except UserError as e:
            raise UserError(f"LoRA {', '.join(n for n, _ in loras)} cannot be applied: {e}") from None
        self.active_loras = self.scheduler.loaded_loras = loras
        if self.metrics:
            self.metrics.lora_switches.inc()
