"""The scheduler: a bounded FIFO of jobs, the batching policy, cancellation and timeouts. The HTTP
side submits, cancels and reads; the engine worker takes batches and reports steps and results.
Everything is under one lock (a Condition the worker waits on).

Policies (--batching):
  none     one job per engine call
  request  the oldest job, plus every queued job with the same batch key (size, steps, guidance,
           clip skip, task, LoRA set) up to --max-batch images: one engine call, each job with its
           own prompts and seeds.
LoRA sets: a switch happens only between calls (counted in the metrics). When the oldest job needs
another set than the loaded one and a queued job uses the loaded one, that job runs first, up to
LORA_PASSES times per oldest job (so a LoRA request waits a bounded number of calls, and
alternating requests do not switch every call).
  step     jobs join and leave the running batch between denoising steps (sdrt.engine.step_slots):
           the worker keeps one batch of --max-batch slots per step key (size, guidance on/off,
           task, LoRA set; steps, guidance scale, clip skip and prompts may differ) and, between
           steps, admits queued jobs of the running key into free slots (`admit`). Once the oldest
           queued job needs another key, no more jobs are admitted: the batch drains, then that
           key runs (no job waits behind an endless stream of compatible ones). Image inputs and
           prompts over one 77-token chunk run per request, between steps."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict

from sdrt.serve.jobs import Job
from sdrt.serve.spec import ApiError, Spec

POLICIES = ("none", "request", "step")
KEEP_FINISHED = 512      # finished jobs kept for status reads (oldest dropped first)
LORA_PASSES = 2          # calls a job may wait for jobs of the loaded LoRA set
KEEP_RESULTS = 32        # ... of which the newest keep their images for GET /v1/jobs/{id}/result


class Scheduler:
    def __init__(self, policy: str = "request", max_batch: int = 4, max_queue: int = 64,
                 timeout: float | None = None, metrics=None):
        if policy not in POLICIES:
            raise ValueError(f"batching policy {policy!r}: use one of {', '.join(POLICIES)}")
        self.policy, self.max_batch, self.max_queue, self.timeout = policy, max_batch, max_queue, timeout
        self.metrics = metrics
        self.cond = threading.Condition()
        self.queue: list[Job] = []
        self.running: list[Job] = []
        self.jobs: "OrderedDict[str, Job]" = OrderedDict()
        self.accepting = True
        self.stopped = False
        self.step_s: float | None = None      # moving average of one denoising step's seconds
        self.decode_s: float = 0.0
        self.loaded_loras: tuple = ()         # the engine's LoRA set (the worker sets it)

    # ---- the HTTP side ---------------------------------------------------------------------------

    def submit(self, spec: Spec, job_id: str | None = None) -> Job:
        with self.cond:
            if not self.accepting:
                self.reject("draining")
                raise ApiError(503, "the server is shutting down: it finishes running jobs and accepts no new ones",
                               kind="server_error")
            if job_id is not None and job_id in self.jobs:
                raise ApiError(409, f"a job with id {job_id!r} exists already: give a new task id", "force_task_id")
            if len(self.queue) >= self.max_queue:
                self.reject("queue_full")
                raise ApiError(429, f"the queue is full ({self.max_queue} jobs waiting): retry later",
                               kind="rate_limit_error")
            job = Job(spec) if job_id is None else Job(spec, id=job_id)
            if self.timeout:
                job.deadline = job.created + self.timeout
            self.jobs[job.id] = job
            self.queue.append(job)
            self.forget_old()
            self.gauge_queue()
            self.cond.notify_all()
            return job

    def retry_after(self) -> int:
        """Seconds a client refused with 429 should wait: about one queued job's run."""
        with self.cond:
            est = (self.step_s or 0.5) * (self.queue[0].steps if self.queue else 25)
        return max(1, int(est + 0.999))

    def get(self, job_id: str) -> Job:
        with self.cond:
            self.expire()
            job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r} (unknown, or finished long ago)", "id", kind="not_found_error")
        return job

    def cancel(self, job: Job, reason: str = "cancelled by the client", label: str = "client") -> Job:
        """Queued: removed now. Running: marked cancelled now; its engine call drops it at the next
        step (and stops when no job in it is left). label: the metric's reason (client, disconnect,
        interrupt)."""
        with self.cond:
            if job.done:
                return job
            if job in self.queue:
                self.queue.remove(job)
                self.moved()
                self.gauge_queue()
            self.end(job, "cancelled", error=reason)
            if self.metrics:
                self.metrics.cancellations.labels(reason=label).inc()
            self.cond.notify_all()
            return job

    def running_ids(self) -> list[str]:
        with self.cond:
            return [j.id for j in self.running if not j.done]

    def status(self, job: Job) -> dict:
        with self.cond:
            pos = self.queue.index(job) if job in self.queue else None
            return {"id": job.id, "state": job.state, "step": job.step, "steps": job.steps,
                    "queue_position": pos, "eta_s": self.eta(job, pos), "error": job.error}

    def eta(self, job: Job, pos: int | None) -> float | None:
        """Seconds until the job is done, from the moving step time (None before the first step)."""
        if job.done:
            return 0.0
        if self.step_s is None:
            return None
        left, decodes = job.steps - job.step, 1
        if pos is not None:        # the running batch, then each job ahead (as if run alone)
            left += max((j.steps - j.step for j in self.running if not j.done), default=0)
            left += sum(j.steps for j in self.queue[:pos])
            decodes += pos + bool(self.running)
        return round(left * self.step_s + decodes * self.decode_s, 2)

    def depth(self) -> int:
        with self.cond:
            return len(self.queue)

    def idle(self) -> bool:
        with self.cond:
            return not self.queue and not self.running

    def drain(self) -> None:
        """Stop accepting; queued jobs are cancelled (the running ones finish)."""
        with self.cond:
            self.accepting = False
            for job in list(self.queue):
                self.queue.remove(job)
                self.end(job, "cancelled", error="the server is shutting down: the job did not start", status=503)
                if self.metrics:
                    self.metrics.cancellations.labels(reason="shutdown").inc()
            self.gauge_queue()
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    # ---- the engine worker -----------------------------------------------------------------------

    def next_batch(self, wait: float = 0.2) -> list[Job] | None:
        """The next jobs to run together ([] after `wait` seconds with nothing to do; None: stop)."""
        with self.cond:
            self.expire()
            if not self.queue:
                if self.stopped:
                    return None
                self.cond.wait(wait)
                self.expire()
                if not self.queue:
                    return None if self.stopped else []
            head = self.pick_head()
            batch = [head] + (self.compatible(self.key(head), self.max_batch - head.spec.n, head)
                              if self.policy != "none" else [])
            self.running = []
            self.start(batch)
            return batch

    def key(self, job: Job) -> tuple:
        """What jobs must share to run together under this policy."""
        return job.spec.step_key() if self.policy == "step" else job.spec.batch_key()

    def admit(self, key: tuple, room: int) -> list[Job]:
        """Step policy, between steps: queued jobs of `key` within `room` images, now running
        (none once the oldest queued job needs another key: the batch drains for it)."""
        with self.cond:
            self.expire()
            if not self.queue or room <= 0 or self.key(self.queue[0]) != key:
                return []
            jobs = self.compatible(key, room)
            self.start(jobs)
            return jobs

    def start(self, jobs: list[Job]) -> None:
        """Under the lock: queued -> running."""
        now = time.monotonic()
        for job in jobs:
            self.queue.remove(job)
            job.state, job.started = "running", now
            job.changed()
            if self.metrics:
                self.metrics.queue_wait.observe(now - job.created)
        self.running += jobs
        if jobs:
            self.moved()
            self.gauge_queue()
        if self.metrics:
            self.metrics.batch_size.set(sum(j.spec.n for j in self.running if not j.done))

    def pick_head(self) -> Job:
        """The oldest job, unless it needs a LoRA switch that a job of the loaded set can defer."""
        head = self.queue[0]
        if head.spec.loras != self.loaded_loras and head.passed < LORA_PASSES:
            same = next((j for j in self.queue if j.spec.loras == self.loaded_loras), None)
            if same is not None:
                head.passed += 1
                return same
        return head

    def compatible(self, key: tuple, room: int, skip: Job | None = None) -> list[Job]:
        """Queued jobs (oldest first) that can share a call of this key (`key(job)`), within
        `room` images. The request policy fills a new call with them; the step policy fills the
        free slots of the running batch with them between steps."""
        out = []
        for job in self.queue:
            if job is not skip and self.key(job) == key and job.spec.n <= room:
                out.append(job)
                room -= job.spec.n
        return out

    def on_step(self, batch: list[Job], step: int, seconds: float) -> list[Job]:
        """After each denoising step: progress, timeouts; returns the jobs still wanted."""
        return self.record_step([(job, step) for job in batch], seconds)

    def on_slots_step(self, progress: list[tuple[Job, int]], seconds: float, occupied: int) -> list[Job]:
        """Step policy, after each step of the slots: each job its own step (progress: (job,
        steps done)); `occupied` slots held a request. Returns the jobs still wanted (the others
        were cancelled or timed out: the worker parks their slots)."""
        if self.metrics:
            self.metrics.step_batch.observe(occupied)
        return self.record_step(progress, seconds)

    def record_step(self, progress: list[tuple[Job, int]], seconds: float) -> list[Job]:
        """One step's time (the ETA's running mean), each job's step; jobs past their deadline
        time out. Returns the jobs still wanted."""
        with self.cond:
            self.step_s = seconds if self.step_s is None else 0.8 * self.step_s + 0.2 * seconds
            if self.metrics:
                self.metrics.step_time.observe(seconds)
            now = time.monotonic()
            live = []
            for job, step in progress:
                if job.done:
                    continue
                if job.deadline is not None and now > job.deadline:
                    self.time_out(job)
                    continue
                job.step = step
                job.changed()
                live.append(job)
            return live

    def succeed(self, job: Job, images: list, info: dict) -> None:
        with self.cond:
            if job.done:
                return
            job.images, job.step = images, job.steps
            job.info = {**info, "queue_wait_s": round(job.started - job.created, 3),
                        "run_s": round(time.monotonic() - job.started, 3)}
            self.end(job, "succeeded")
            if self.metrics:
                self.metrics.images.inc(len(images))
                self.metrics.add_images(len(images))
                self.metrics.image_latency.observe(job.finished - job.created)

    def fail(self, job: Job, status: int, message: str) -> None:
        with self.cond:
            if job.done:
                return
            self.end(job, "failed", error=message, status=status)
            if self.metrics:
                self.metrics.failures.labels(status=str(status)).inc()

    def batch_done(self, batch: list[Job], decode_s: float | None = None) -> None:
        with self.cond:
            if decode_s is not None:
                self.decode_s = decode_s if not self.decode_s else 0.8 * self.decode_s + 0.2 * decode_s
            self.running = [j for j in self.running if j not in batch]
            if self.metrics:
                self.metrics.batch_size.set(sum(j.spec.n for j in self.running if not j.done))
            self.cond.notify_all()

    # ---- under the lock --------------------------------------------------------------------------

    def end(self, job: Job, state: str, error: str | None = None, status: int | None = None) -> None:
        job.state, job.error, job.error_status = state, error, status
        job.finished = time.monotonic()
        job.spec.release_inputs()
        job.changed()

    def time_out(self, job: Job) -> None:
        self.end(job, "failed", error=f"timed out: not done within {self.timeout:g} s (--timeout)", status=504)
        if self.metrics:
            self.metrics.cancellations.labels(reason="timeout").inc()

    def expire(self) -> None:
        """Queued jobs past their deadline fail with 504."""
        now = time.monotonic()
        for job in [j for j in self.queue if j.deadline is not None and now > j.deadline]:
            self.queue.remove(job)
            self.time_out(job)
        self.gauge_queue()

    def forget_old(self) -> None:
        """Bounded memory: old finished jobs are forgotten, and all but the newest results' images."""
        finished = [j for j in self.jobs.values() if j.done]
        for job in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self.jobs[job.id]
        for job in finished[:max(0, len(finished) - KEEP_RESULTS)]:
            job.images = None

    def moved(self) -> None:
        """The queue moved: its jobs' positions changed (their event streams say so)."""
        for job in self.queue:
            job.changed()

    def reject(self, reason: str) -> None:
        if self.metrics:
            self.metrics.rejections.labels(reason=reason).inc()

    def gauge_queue(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self.queue))
