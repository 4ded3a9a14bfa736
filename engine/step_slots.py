"""Step-level batching: one shape plan whose B batch slots each run their own request, at their
own step. What a server's continuous batching drives; `Pipeline.generate` is the case where every
slot starts together on the same rows.

Per slot b the step graph reads
    row            step_table[min(step_index[b], STEP_TABLE_ROWS - 1)]   its sampler, step, guidance
    embeddings     rows b (unconditional) and B + b (conditional) of text_embeddings (with guidance)
    latents, x̂0    row b of the ping-ponged latents and x0 buffers
    noise          step_noise[b, min(step_index[b], N - 1)]
and writes step_index[b] + 1. The table is shared: each request's rows live in its own row range
(`write_rows(offset, table)`; a request of S steps owns rows offset .. offset + S - 1, and its slot
starts at offset + its first step). The last row, PARKED, stays all zero: a slot parked there
steps on zeros (finite, ignored) until it is given a request.

    slots = pipe.step_slots(batch=4, height=512, width=512, guidance=True, noise_steps=1000)
    t = samplers.step_table(pipe.scheduler_config, Sampler.parse("DPM++ 2M Karras"), 20, 7.0)
    slots.write_rows(0, t)                                    # rows 0..19: this request
    slots.start(0, row=0, latents=eps * t.init_sigma, embeddings=slots.embed("a fox", ""),
                noise=z)                                      # z: [20, C, h, w] or None
    slots.advance()                                           # every slot one step, one launch
    ... slots.finished(0, last_row=19) -> slots.latents(0) -> slots.decode(x) -> uint8 images

Host work: `advance()` is one launch (plus the parity flip); `start` / `write_rows` / `latents`
write or read one slot's rows (each waits for its copy on a GPU backend), per request, not per step.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from sdrt.contract import STEP_TABLE_ROWS, Dims
from sdrt.engine.buffers import DeviceBuffer, HostBuffer, read_rows, write_rows
from sdrt.engine.conditioning import emphasize
from sdrt.errors import UserError

PARKED = STEP_TABLE_ROWS - 1


class StepSlots:
    def __init__(self, pipe, batch: int, height: int, width: int, guidance: bool = True,
                 noise_steps: int = 1, variant: str = "plain"):
        self.pipe = pipe
        dims = pipe.dims(height, width, batch, 7.5 if guidance else 1.0)
        self.dims = replace(dims, noise_steps=noise_steps)
        self.plan = pipe.plan(self.dims, variant)
        if "x0_0" not in self.plan.buf:
            raise UserError(f"{pipe.work_dir} was exported before the samplers: export again for step slots")
        self.table = np.zeros(self.plan.buf["step_table"].shape, np.float32)
        self.parity = 0                                    # which ping-pong buffer holds the state
        self.index = np.full(batch, PARKED, np.int64)      # host mirror of step_index
        self.plan.buf["step_table"].write(self.table)
        self.plan.buf["step_index_0"].write(self.index.astype(np.int32))
        self._text = {}

    @property
    def batch(self) -> int:
        return self.dims.batch

    def write_rows(self, offset: int, table) -> None:
        """Rows [offset, offset + table.steps) of the shared table <- a request's rows
        (sdrt.engine.samplers.Table); the other rows are kept."""
        if offset < 0 or offset + table.steps > PARKED:
            raise UserError(f"rows {offset}..{offset + table.steps - 1} do not fit the step table "
                            f"(rows 0..{PARKED - 1}; row {PARKED} is the parked row)")
        self.table[offset:offset + table.steps] = table.rows[:table.steps, :self.table.shape[1]]
        self.plan.buf["step_table"].write(self.table)

    def embed(self, prompt: str, negative: str = "") -> np.ndarray:
        """[2, text_len, D] (unconditional, conditional) or [1, ...] without guidance: the text
        encoder's output for one request, emphasis applied (prompts of one 77-token chunk)."""
        cond = self.pipe.conditioning(self.pipe.embeddings)
        rows = [negative, prompt] if self.dims.cfg else [prompt]
        text = cond.rows(rows)
        if len(text.ids) != len(rows):
            raise UserError("step slots take prompts of one chunk (75 tokens): shorten the prompt")
        run, buf = self._text_encoder(len(rows))
        buf["inputs_embeds"].write(cond.lookup(text.ids))
        buf["clip_skip"].write(np.array([1], np.int32))
        run.run()
        return emphasize(buf["text_embeddings"].read(), text.weights)

    def start(self, slot: int, row: int, latents: np.ndarray, embeddings: np.ndarray, noise=None) -> None:
        """Slot `slot` begins at table row `row` from `latents` [C, h, w] (x_T, already scaled by
        the table's init_sigma, or the noised image latents), with `embeddings` from `embed` and,
        for a stochastic sampler, `noise` [steps, C, h, w] written to its rows row.. of step_noise."""
        self._check_slot(slot)
        buf, k, b = self.plan.buf, self.parity, self.batch
        write_rows(buf[f"latents_{k}"], slot, np.asarray(latents, np.float32)[None])
        write_rows(buf[f"x0_{k}"], slot, np.zeros((1, *buf[f"x0_{k}"].shape[1:]), np.float32))
        emb = np.asarray(embeddings)
        if self.dims.cfg:
            write_rows(buf["text_embeddings"], slot, emb[:1])
            write_rows(buf["text_embeddings"], b + slot, emb[1:2])
        else:
            write_rows(buf["text_embeddings"], slot, emb[:1])
        if noise is not None:
            n = buf["step_noise"].shape[1]
            if row + len(noise) > n:
                raise UserError(f"noise rows {row}..{row + len(noise) - 1} exceed the slots' noise_steps {n}")
            z = read_rows(buf["step_noise"], slot, 1)
            z[0, row:row + len(noise)] = noise
            write_rows(buf["step_noise"], slot, z)
        self.index[slot] = row
        write_rows(buf[f"step_index_{k}"], slot, np.array([row], np.int32))

    def park(self, slot: int) -> None:
        """The slot steps on the all-zero row until it is given a request."""
        self._check_slot(slot)
        self.index[slot] = PARKED
        write_rows(self.plan.buf[f"step_index_{self.parity}"], slot, np.array([PARKED], np.int32))

    def advance(self) -> None:
        """One step for every slot: one launch of the (captured) step graph."""
        self.plan.steps[self.parity].run()
        self.parity = 1 - self.parity
        self.index = np.minimum(self.index + 1, PARKED)

    def finished(self, slot: int, last_row: int) -> bool:
        """Whether the slot has run its request's row `last_row` (host bookkeeping, no sync)."""
        return self.index[slot] > last_row

    def latents(self, slot: int) -> np.ndarray:
        """The slot's current latents [C, h, w] (waits for the stream)."""
        self._check_slot(slot)
        return read_rows(self.plan.buf[f"latents_{self.parity}"], slot, 1)[0]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """uint8 [n, H, W, 3] from latents [n, C, h, w] (the VAE decoder at batch n)."""
        return self.pipe.decode(np.asarray(latents, np.float32), self.dims.height, self.dims.width)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.batch:
            raise UserError(f"slot {slot} outside 0..{self.batch - 1}")

    def _text_encoder(self, rows: int):
        if rows not in self._text:
            te = self.pipe.models["text_encoder"]
            d = Dims(rows, self.dims.height, self.dims.width, cfg=False, vae_factor=self.dims.vae_factor,
                     text_len=self.dims.text_len)
            shapes = te.shapes(d)
            Buffer = DeviceBuffer if self.pipe.backend.device == "cuda" else HostBuffer
            buf = {t.name: Buffer(shapes[t.name], t.dtype, self.pipe.backend.stream) for t in te.tensors}
            self._text[rows] = (self.pipe.backend.runner(te, d).bind(buf, shapes), buf)
        return self._text[rows]
