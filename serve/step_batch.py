"""--batching step: the running batch of the engine worker (sdrt.engine.step_slots.StepSlots at
--max-batch slots). Jobs join free slots between denoising steps and leave when their last step
is done (then their VAE decode runs); each slot has its own step index, table rows (its own
sampler: DDIM, Euler and DPM++ 2M jobs share the slots), guidance, prompt embeddings and initial
noise. Stochastic samplers (their per-step noise) run per request between steps. Parked slots step on zeros. Used by the worker thread only.

Rows of the shared step table: slot s owns rows s * R .. s * R + R - 1 (R = the parked row //
slots), so a job of n images writes its rows once per slot and starts there at step 0."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from sdrt.engine.request import noise as seeded_noise
from sdrt.engine.samplers import STOCHASTIC, step_table
from sdrt.engine.step_slots import PARKED
from sdrt.serve.jobs import Job


@dataclass(eq=False)
class Entry:
    """A job in the slots: its slots (one per image), its first table row per slot, its steps."""
    job: Job
    slots: list
    rows: list
    steps: int
    done: int = 0                    # steps run
    denoise_s: float = 0.0
    occupied: int = 0                # occupied slots summed over its steps
    started: float = field(default_factory=time.perf_counter)


class StepBatch:
    def __init__(self, slots):
        self.slots = slots
        self.rows_per_slot = PARKED // slots.batch
        self.occupant: list[Entry | None] = [None] * slots.batch
        self.entries: list[Entry] = []

    @property
    def free(self) -> int:
        return sum(e is None for e in self.occupant)

    @property
    def occupied(self) -> int:
        return self.slots.batch - self.free

    def fits(self, spec) -> str | None:
        """Why this job cannot take slots (None: it can); such a job runs per request."""
        if spec.task != "txt2img" or spec.control:
            return "image inputs"
        if spec.method.kind in STOCHASTIC:
            return "a stochastic sampler (its per-step noise rows are per request)"
        if spec.steps > self.rows_per_slot:
            return f"more than {self.rows_per_slot} steps"
        cond = self.slots.pipe.conditioning(self.slots.pipe.embeddings)
        texts = (spec.prompt, spec.negative) if spec.guidance > 1.0 else (spec.prompt,)
        if any(len(cond.chunks(t)) > 1 for t in texts):
            return "a prompt over one 77-token chunk"
        return None

    def place(self, job: Job) -> Entry:
        """The job's images into free slots, from step 0 (x_T from each image's seed, as
        `Pipeline.run` draws it for a batch of per-image seeds)."""
        spec, s = job.spec, self.slots
        free = [i for i, e in enumerate(self.occupant) if e is None][:spec.n]
        assert len(free) == spec.n, "place: not enough free slots"
        table = step_table(s.pipe.scheduler_config, spec.method, spec.steps, spec.guidance)
        emb = s.embed(spec.prompt, spec.negative, spec.clip_skip)
        c, h, w = s.plan.buf["latents_0"].shape[1:]
        entry = Entry(job, free, [i * self.rows_per_slot for i in free], spec.steps)
        for slot, row, seed in zip(free, entry.rows, spec.seeds):
            s.write_rows(row, table)
            x = seeded_noise((1, c, h, w), [seed])[0]            # ε; x_T = init_sigma ε
            if table.init_sigma != 1.0:
                x = (x * np.float32(table.init_sigma)).astype(np.float32)
            s.start(slot, row, x, emb)
        for slot in free:
            self.occupant[slot] = entry
        self.entries.append(entry)
        return entry

    def advance(self) -> float:
        """One step of every slot; its seconds (each job in it gets one step done)."""
        t0 = time.perf_counter()
        self.slots.advance()
        dt = time.perf_counter() - t0
        occupied = self.occupied
        for e in self.entries:
            e.done += 1
            e.denoise_s += dt
            e.occupied += occupied
        return dt

    def finished(self) -> list[Entry]:
        return [e for e in self.entries
                if all(self.slots.finished(slot, row + e.steps - 1) for slot, row in zip(e.slots, e.rows))]

    def images(self, entry: Entry) -> tuple[np.ndarray, float]:
        """uint8 [n, H, W, 3] of a finished entry, and the decode's seconds."""
        t0 = time.perf_counter()
        x = np.stack([self.slots.latents(slot) for slot in entry.slots])
        return self.slots.decode(x), time.perf_counter() - t0

    def remove(self, entry: Entry) -> None:
        """The entry's slots parked (freed)."""
        for slot in entry.slots:
            self.slots.park(slot)
            self.occupant[slot] = None
        self.entries.remove(entry)
