"""Text to image, image to image, inpainting: prompt -> token ids -> embeddings; image -> latents;
the loop; decode. Over any backend.

    ids, w  = chunks([negative] * B + [prompt] * B)            (CFG: unconditional rows first)
    emb     = emphasize(text_encoder(table[ids], clip_skip), w)  77-token chunks, see conditioning
    ε       = N(0, I) from the seed, or the given latents
    text to image:   s = 0,                              x = ε
    image to image:  s = steps - int(steps·strength),    x = sqrt(ᾱ_s) vae_encoder(image) + sqrt(1-ᾱ_s) ε
    inpainting:      as image to image (strength 1: x = ε); the step graph also reads the latent
                     mask and the (masked-)image latents, bound once per call
    upscaling:       x = init_noise_sigma ε at the low-res image's size; the step graph also reads
                     the noised low-res image and the noise level (sdrt.engine.upscaler)
    for i in range(s, steps): launch(step graph i % 2)          UNet + CFG + DDIM, in one graph
    image   = vae_decoder(x_0)                                 in slices of the batch if asked

All buffers of a shape plan are allocated once and bound once. The step graph reads its per-step
values from a device table (`step_table[step_index]`) and writes `step_index + 1`; two bindings
ping-pong latents and index, so one captured CUDA graph per direction serves every step, with no
host sync and no re-binding inside the loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sdrt import manifest as mf
from sdrt.contract import Dims, Step, Task, Variant, control_image, has_sampler_state, tasks_of_unet
from sdrt.engine import backends, cuda, image_input, samplers, scheduler, vae_slices
from sdrt.engine.buffers import DeviceBuffer, HostBuffer, Rows, copy_rows
from sdrt.engine.conditioning import Conditioning, emphasize
from sdrt.engine.lora import LoraState
from sdrt.engine.request import GenerateRequest, RequestError, StepCallback, noise as seeded_noise, resolve_seed
from sdrt.engine.timing import Clock
from sdrt.engine.tokenizer import ClipTokenizer
from sdrt.engine.upscaler import Upscaler
from sdrt.errors import UserError


@dataclass
class Result:
    images: np.ndarray                        # uint8 [B, H, W, 3]
    timings: dict = field(default_factory=dict)
    seed: int | list[int] | None = None       # the seed(s) the noise came from (None: latents given)

    def pil(self) -> list:
        from PIL import Image
        return [Image.fromarray(a) for a in self.images]


@dataclass
class Plan:
    """Everything bound for one (batch, size, guidance) shape and step variant (self.plans is keyed
    by (dims, variant, ControlNets))."""
    dims: Dims
    buf: dict
    text: object
    steps: list                               # two cuda.Launch: even and odd steps
    vae: dict                                 # {slice size: [bindings, one per slice]}
    vae_batch: int                            # slice size when the caller gives none
    encoder: object = None                    # vae_encoder at batch 1, bound on first image input

    @property
    def graph(self) -> tuple[str, str]:
        """(path, error) of the step launches: sdrt | onnxruntime | none, and why not sdrt."""
        paths = sorted({s.graph for s in self.steps})
        return "/".join(paths), next((s.error for s in self.steps if s.error), "")


class Pipeline:
    """embeddings: textual-inversion files ("FILE[:TOKEN]" or (FILE, TOKEN)) for every generate
    call that does not name its own."""

    def __init__(self, work_dir: Path, backend: str = "auto", ort_fusion: bool = True, embeddings=(),
                 loras=()):
        self.work_dir = Path(work_dir)
        self.manifest = mf.load(self.work_dir)
        self.config = mf.config(self.manifest)
        self.models = mf.models(self.manifest)
        self.tokenizer = ClipTokenizer.from_dir(self.work_dir / "tokenizer")
        self.token_table = load_token_table(self.work_dir, self.manifest)
        self.conditionings: dict[tuple, Conditioning] = {}
        self.embeddings = tuple(embeddings)
        self.conditioning(self.embeddings)               # bad files fail here, before any session
        self.scheduler_config = scheduler.read_config_json(self.work_dir / "scheduler" / "scheduler_config.json")
        self.scheduler = scheduler.DDIMConfig.from_json(self.scheduler_config)
        self.backend = backends.open_backend(backend, self.work_dir, self.manifest, ort_fusion)
        self.plans: dict[tuple[Dims, Variant, int], Plan] = {}
        self.decoders: dict = {}               # Pipeline.decode's VAE bindings
        self.graph: tuple[str, str] = ("", "")  # (path, error) of the last generation's step
        self.loras = LoraState(self.work_dir, self.manifest)
        self.upscaler = Upscaler(self.manifest["upscaler"]) if self.config.upscaler else None
        if loras:
            self.set_loras(loras)

    def set_loras(self, loras) -> dict:
        """Apply [(path, scale), ...] instead of the LoRAs before (an empty list: the base model).
        Merged weights W₀ + Σ s·ΔW are computed from the export's base weights and handed to the
        backend: new ONNX Runtime sessions, or a TensorRT refit; nothing is exported or built.
        Returns {"read_ms", "merge_ms", "apply_ms", "weights"}; the sessions or CUDA graphs are
        made by the next generate (its setup_ms)."""
        timings = self.loras.switch(self.backend, loras)
        self.plans.clear()                     # bindings and CUDA graphs follow the new weights
        return timings

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def conditioning(self, embeddings) -> Conditioning:
        """Tokenizer + token table with these embeddings' tokens (kept per set of files)."""
        key = tuple(map(str, embeddings))
        if key not in self.conditionings:
            self.conditionings[key] = Conditioning(self.tokenizer, self.token_table, self.config.text_len,
                                                   embeddings)
        return self.conditionings[key]

    def generate(self, prompt, negative="", steps=50, guidance=7.5, height=None, width=None,
                 batch=None, seed=None, latents=None, vae_batch=None, clip_skip=1, embeddings=None, image=None,
                 mask=None, strength=None, resize=False, loras=None, prompt_syntax="webui",
                 sampler="DDIM", schedule=None, noise=None, cfg_cutoff=None, on_step=None, control=None,
                 control_preprocess=None, noise_level=None, image_noise=None) -> Result:
        """`run(GenerateRequest(...))`: the request's fields as keywords (see sdrt.engine.request).
        Text to image; with `image` (path, PIL image or uint8 array), image to image (strength
        default 0.75); with `image` and `mask` (white = repaint), inpainting (strength default 1.0).
        control: one entry per exported ControlNet, "IMAGE[:SCALE[:START:END]]" or (IMAGE, SCALE,
        START, END) (sdrt.engine.request.Control). On an upscaler export, `image` is the low-resolution
        image: the output is 4x its size; noise_level (default 20) and image_noise (its noise
        [1 | B, 3, h, w] instead of the seed's) apply (sdrt.engine.upscaler)."""
        return self.run(GenerateRequest(prompt, negative, steps, guidance, height, width, batch, seed, latents,
                                        image, mask, strength, resize, clip_skip, embeddings, loras, vae_batch,
                                        prompt_syntax, sampler, schedule, noise, cfg_cutoff, control,
                                        control_preprocess, noise_level, image_noise),
                        on_step=on_step)

    def run(self, request: GenerateRequest, on_step: StepCallback | None = None) -> Result:
        """One generation. prompt/negative: any length (77-token chunks), emphasis syntax
        (sdrt.engine.prompt_parser) unless prompt_syntax="plain". embeddings None: the pipeline's;
        loras None: the ones applied now (else switched to these when they differ). latents: the
        noise ε; vae_batch: decode in slices of this many images (None: the whole batch, or what
        fits the free device memory; see sdrt.engine.vae_slices).

        on_step(step_done, steps_total) is called after each denoising step is launched; it may
        raise (e.g. request.Cancelled) to stop before the next one, and the exception propagates.
        On a GPU backend the steps are queued asynchronously, so it reports launched steps, not
        finished ones; the CPU backend runs each step before it returns. Without a callback the
        loop is unchanged (no host sync is added)."""
        t0 = time.perf_counter()
        r = request
        if r.loras is not None and [(Path(p), s) for p, s in r.loras] != list(self.loras.applied):
            self.set_loras(r.loras)           # only when the set differs: a switch re-makes sessions
        seed = r.used_seed()
        low = self.upscaler.prepare(r, self.config.vae_factor, r.batch, seed) if self.upscaler else None
        for field in ("noise_level", "image_noise"):
            if not low and getattr(r, field) is not None:
                raise RequestError(field, f"{{{field}}} is for upscaler exports (StableDiffusionUpscalePipeline): "
                                          f"{self.work_dir} is not one")
        source = None if low else self.source(r.image, r.mask, r.resize, r.height, r.width)
        variant = Variant.upscale if low else self.variant(source)
        controls = self.controls(r.control, r.control_preprocess)
        height, width = (source.height, source.width) if source is not None else \
            (low.height, low.width) if low else (r.height, r.width)
        if controls and source is None and (height, width) == (None, None):
            height, width = image_input.default_size(controls[0][1], self.config.vae_factor)
        cond = self.conditioning(self.embeddings if r.embeddings is None else r.embeddings)
        layers = self.check_clip_skip(r.clip_skip)
        steps = r.steps
        strength = self.strength(source, r.strength)
        start = self.start_index(steps, strength) if source is not None else 0
        table = self.step_table(r.sampler, steps, r.guidance, start)
        table = replace(table, rows=self.control_columns(table.rows, [c for c, _ in controls], steps, start))
        rows = r.rows()
        text = cond.rows(rows, r.prompt_syntax)   # ids, weights [rows * k, 77]
        dims = self.dims(height, width, r.batch, r.guidance, chunks=len(text.ids) // len(rows))
        if table.stochastic:
            dims = replace(dims, noise_steps=steps)
        noise = self.initial_latents(dims, seed, r.latents)            # ε (x_T for text to image)
        z = self.step_noise(dims, steps, seed, r) if table.stochastic or r.noise is not None else None
        z = z if table.stochastic else None
        embeds = cond.lookup(text.ids)
        t_tok = time.perf_counter()

        fresh = (dims, variant, len(controls)) not in self.plans
        plan = self.plan(dims, variant, len(controls))
        self.check_sampler(plan, r.sampler)
        run_steps = steps - start
        guided = samplers.guided_steps(run_steps, r.cfg_cutoff) if dims.cfg else run_steps
        unguided = self.cutoff_plan(plan, variant, len(controls)) if guided < run_steps else None
        final = unguided or plan               # the plan whose buffers hold x_0 (and the image)
        vae_size = min(r.vae_batch or final.vae_batch, r.batch)
        vae_runs = self.vae_bindings(final, final.dims, vae_size)
        t_plan = time.perf_counter()
        buf, clock = plan.buf, Clock(self.backend.stream)
        buf["inputs_embeds"].write(embeds)
        buf["clip_skip"].write(layers)
        for p in (plan, unguided) if unguided else (plan,):
            self.write_sampler_inputs(p, table, start, z)
            if low:                            # the noised low-res image and the noise level, once per call
                p.buf["low_res_image"].write(low.image)
                p.buf["class_labels"].write(low.class_labels(p.buf["class_labels"].shape[0]))
            for k, (_, pil) in enumerate(controls):   # bound once per call, repeated over the batch
                image = image_input.control_array(pil, height, width)
                p.buf[control_image(k)].write(np.repeat(image, dims.batch, 0))
        clock.mark("start")
        plan.text.run()
        if (text.weights != 1.0).any():       # emphasis: a round trip (and sync) of the embeddings
            e = buf["text_rows"].read()
            buf["text_rows"].write(emphasize(e, text.weights))
        if unguided:                           # the conditional half, for the steps after the cut-off
            copy_rows(unguided.buf["text_embeddings"], Rows(buf["text_embeddings"], r.batch, r.batch))
        clock.mark("text_encoder")
        if source is None:                     # x_T = init_noise_sigma ε (1 but for the Euler samplers)
            x = noise if table.init_sigma == 1.0 else (noise * np.float32(table.init_sigma)).astype(np.float32)
        else:
            x = self.image_latents((plan, unguided), source, variant, noise, table, strength)
        clock.mark("vae_encoder")
        buf["latents_0"].write(x)
        for i in range(run_steps):
            if i == guided:                    # the CFG cut-off: hand the sampler state over, on the stream
                k = guided % 2
                for name in ("latents", "x0", "step_index"):
                    if f"{name}_{k}" in buf:
                        copy_rows(unguided.buf[f"{name}_0"], buf[f"{name}_{k}"])
            if i < guided:
                plan.steps[i % 2].run()
            else:
                unguided.steps[(i - guided) % 2].run()
            clock.mark("step")
            if on_step is not None:
                on_step(i + 1, run_steps)
        if (run_steps - (guided if unguided else 0)) % 2:   # x_0 landed in the odd buffer; the VAE reads latents_0
            final.buf["latents_0"].copy_from(final.buf["latents_1"])
        for vae in vae_runs:
            vae.run()
        clock.mark("vae")
        image = final.buf["image"].read()      # the one sync (image inputs: one more, after the encoder)
        self.check_finite(image, final.buf)
        timings = self.timings(clock, t0, t_tok)
        timings["setup_ms"] = (t_plan - t_tok) * 1e3 if fresh else 0.0  # buffers, bindings, graphs
        self.graph = plan.graph
        timings["graph"], timings["graph_error"] = plan.graph
        timings["vae_batch"] = vae_size
        timings["seed"] = seed
        timings["sampler"], timings["guided_steps"] = r.sampler.label, guided
        timings["unet_evaluations"] = run_steps + (guided if dims.cfg else 0)   # per image
        return Result(to_uint8(image), timings, seed)

    # ---- ControlNets --------------------------------------------------------------------------------

    def controls(self, control, preprocess=None) -> list:
        """[(Control, PIL image)] for the export's ControlNets, in export order; [] without control.
        preprocess ("canny", (low, high)): the images' edge maps instead (image_input.canny)."""
        if control is None or len(control) == 0:
            return []
        n = self.config.controlnets
        if n == 0:
            raise RequestError("control", f"{self.work_dir} was exported without ControlNet: export with "
                                          f"`sdrt export MODEL WORK_DIR --controlnet CN_DIR` to use {{control}}")
        if len(control) != n:
            raise RequestError("control", f"{{control}} gives {len(control)} image(s), the export has {n} "
                                          f"ControlNet(s): give one per ControlNet, in export order")
        images = [image_input.load(c.image, "control image") for c in control]
        if preprocess is not None:
            images = [image_input.canny(im, *preprocess[1]) for im in images]
        return list(zip(control, images))

    @staticmethod
    def control_columns(rows: np.ndarray, controls: list, steps: int, start: int) -> np.ndarray:
        """The step table's rows with one column per ControlNet: its scale at each step run, 0
        outside its step window (step i of the n run, as diffusers counts them: the strength's
        share skipped)."""
        if not controls:
            return rows
        n = steps - start
        cols = np.zeros((len(rows), len(controls)), np.float32)
        for k, c in enumerate(controls):
            cols[start:steps, k] = [c.scale * c.keep(i, n) for i in range(n)]
        return np.concatenate([rows, cols], 1)

    # ---- samplers ---------------------------------------------------------------------------------

    def check_sampler(self, plan: "Plan", sampler) -> None:
        if sampler.kind != "ddim" and "x0_0" not in plan.buf:
            raise RequestError("sampler", f"{self.work_dir} was exported before the samplers: it runs DDIM only; "
                            f"run `sdrt export` again for --sampler {sampler.kind}")

    def step_table(self, sampler, steps: int, guidance: float, start: int):
        try:
            return samplers.step_table(self.scheduler_config, sampler, steps, guidance, start)
        except UserError as e:
            if isinstance(e, RequestError):
                raise
            field = "steps" if str(e).startswith("steps") else "sampler"
            raise RequestError(field, str(e)) from None

    def start_index(self, steps: int, strength: float) -> int:
        try:
            return scheduler.start_index(steps, strength)
        except UserError as e:
            if isinstance(e, RequestError):
                raise
            raise RequestError("strength", str(e)) from None

    def step_noise(self, dims: Dims, steps: int, seed, r) -> np.ndarray:
        """z for every step, [steps, B, C, h, w]: the request's, or drawn from the seed (with
        given latents and no seed: a random one)."""
        shape = (dims.batch, self.config.latent_channels, dims["latent_h"], dims["latent_w"])
        if r.noise is not None:
            try:
                return samplers.check_noise(r.noise, steps, shape)
            except UserError as e:
                raise RequestError("noise", str(e)) from None
        if seed is None:
            seed = [resolve_seed(s) for s in r.seed] if isinstance(r.seed, list) else resolve_seed(r.seed)
        return samplers.step_noise(seed, steps, shape)

    def write_sampler_inputs(self, plan: "Plan", table, start: int, z) -> None:
        """The step table, every sample's first row, a zero x̂0_prev and the step noise (sample-major:
        the graph gathers step_noise[b, step_index[b]])."""
        buf = plan.buf
        index = np.full(buf["step_index_0"].shape, start, np.int32)    # [B] (older exports: [1])
        buf["step_index_0"].write(index)
        buf["step_table"].write(table.rows[:, :buf["step_table"].shape[1]])  # older exports: fewer columns
        if "x0_0" in buf:
            buf["x0_0"].write(np.zeros(buf["x0_0"].shape, np.float32))
            if z is not None:                  # else rows of finite values times c_noise = 0
                buf["step_noise"].write(np.ascontiguousarray(z.transpose(1, 0, 2, 3, 4)))

    def step_slots(self, batch: int, height: int | None = None, width: int | None = None, guidance: bool = True,
                   noise_steps: int = 1, variant: str = "plain"):
        """Step-level batching over one shape plan: each of `batch` slots its own request, rows,
        guidance, embeddings and noise, at its own step (sdrt.engine.step_slots.StepSlots)."""
        from sdrt.engine.step_slots import StepSlots
        return StepSlots(self, batch, height, width, guidance, noise_steps, variant)

    def decode(self, latents: np.ndarray, height: int, width: int) -> np.ndarray:
        """uint8 [n, H, W, 3] from latents [n, C, h, w]: the VAE decoder bound at batch n (kept)."""
        n = len(latents)
        key = ("decode", n, height, width)
        if key not in self.decoders:
            vae = self.models["vae_decoder"]
            d = replace(self.dims(height, width, n, 1.0))
            shapes = vae.shapes(d)
            Buffer = DeviceBuffer if self.backend.device == "cuda" else HostBuffer
            buf = {t.name: Buffer(shapes[t.name], t.dtype, self.backend.stream) for t in vae.tensors}
            self.decoders[key] = (self.backend.runner(vae, d).bind(buf, shapes), buf)
        run, buf = self.decoders[key]
        buf["latents"].write(latents)
        run.run()
        return to_uint8(buf["image"].read())

    def cutoff_plan(self, plan: "Plan", variant: str, controlnets: int = 0) -> "Plan":
        """The unguided plan (batch B) the steps after the CFG cut-off run on."""
        if self.backend.max_plans is not None and self.backend.max_plans < 2:
            raise RequestError("cfg_cutoff", f"{{cfg_cutoff}} runs two shape plans (guided and unguided); the {self.backend.name} "
                            f"backend keeps one: use --backend tensorrt or onnxruntime-cpu, or leave it out")
        return self.plan(replace(plan.dims, cfg=False), variant, controlnets)

    # ---- image inputs -----------------------------------------------------------------------------

    def source(self, image, mask, resize, height, width):
        """The prepared image (and mask), or None for text to image."""
        if image is None:                      # a mask without an image: refused by GenerateRequest
            return None
        src = image_input.prepare(image, mask, self.config.vae_factor, resize)
        for what, asked, got in (("height", height, src.height), ("width", width, src.width)):
            if asked is not None and asked != got:
                raise RequestError(what, f"{{{what}}} {asked}: with an image the output is the image's size "
                                         f"({src.width}x{src.height}); leave {{height}}/{{width}} out")
        return src

    def variant(self, source) -> Variant:
        """The step variant this call runs on this export's UNet (sdrt.contract.Variant.for_task)."""
        task = Task.of(image=source is not None, mask=source is not None and source.mask is not None)
        if task not in tasks_of_unet(self.config):
            raise RequestError("mask" if source is not None else "image",
                               f"{self.work_dir} holds an inpainting UNet ({self.config.unet_channels} input "
                               f"channels): it needs {{image}} and {{mask}}; text to image and image to image "
                               f"need an export of an ordinary {self.config.latent_channels}-channel UNet")
        return Variant.for_task(self.config, task, where=str(self.work_dir))

    def strength(self, source, strength):
        """Defaults as diffusers': 0.75 for image to image, 1.0 for inpainting."""
        if source is None:                     # strength without an image: refused by GenerateRequest
            return None
        if strength is None:
            return 1.0 if source.mask is not None else 0.75
        return strength

    def image_latents(self, plans, source, variant: Variant, noise: np.ndarray, table, strength: float) -> np.ndarray:
        """x at the first step run; writes the step graphs' extra inputs (those its variant declares,
        bound once per call; the guided plan's and the CFG cut-off's unguided one). Encodes at batch 1
        and repeats over the batch (one host sync: the latents are noised here, once per call) with
        the sampler's own forward process."""
        plan = plans[0]
        b = noise.shape[0]
        x0 = np.repeat(self.encode(plan, source.image), b, 0)
        per_call = {"mask": lambda: np.repeat(source.latent_mask(self.config.vae_factor), b, 0),
                    "image_latents": lambda: x0,
                    "noise": lambda: noise,
                    "masked_image_latents": lambda: np.repeat(self.encode(plan, source.masked_image), b, 0)}
        for name in variant.spec.extra_inputs:
            value = per_call[name]()
            for p in plans:
                if p is not None:
                    p.buf[name].write(value)
        if source.mask is not None and strength == 1.0:   # inpainting at strength 1 starts from pure noise
            return noise if table.init_sigma == 1.0 else (noise * np.float32(table.init_sigma)).astype(np.float32)
        p, q = table.add_noise                       # x_s = p x0 + q ε (sdrt.engine.samplers)
        return (np.float32(p) * x0 + np.float32(q) * noise).astype(np.float32)

    def encode(self, plan: Plan, image: np.ndarray) -> np.ndarray:
        """vae_encoder: [1, 3, H, W] in [-1, 1] -> [1, C, H/f, W/f] (posterior mean · scaling factor)."""
        if plan.encoder is None:               # bound on first use: text to image never loads it
            plan.encoder = self.encoder_binding(plan.dims, plan.buf)
        plan.buf["enc_image"].write(image)
        plan.encoder.run()
        return plan.buf["enc_latents"].read()

    def encoder_binding(self, dims: Dims, buf: dict):
        """vae_encoder at batch 1 (one image per call)."""
        enc = self.model("vae_encoder", "image inputs")
        one = replace(dims, batch=1)
        shapes = enc.shapes(one)
        Buffer = DeviceBuffer if self.backend.device == "cuda" else HostBuffer
        buf["enc_image"] = Buffer(shapes["image"], "float32", self.backend.stream)
        buf["enc_latents"] = Buffer(shapes["latents"], "float32", self.backend.stream)
        return self.backend.runner(enc, one).bind({"image": buf["enc_image"], "latents": buf["enc_latents"]},
                                                  shapes)

    # ---- shapes, noise, plans -----------------------------------------------------------------------

    # model -> (its name for people, the export flag that makes it FP32), upstream first
    FP32_FLAGS = {"text_encoder": ("text encoder", "--text-encoder-precision fp32"),
                  "unet": ("UNet", "--precision fp32"),
                  "vae_decoder": ("VAE decoder", "--vae-precision fp32")}

    def check_finite(self, image: np.ndarray, buf: dict) -> None:
        """FP16 that fails loudly: real weights (SD 2.x, many fine-tuned VAEs) can overflow FP16
        where the export's random-input validation did not, giving NaN -> black images. Once per
        call, after the sync: the image and the final latents (a small read); on a non-finite
        value, the embeddings too, to name the first model that produced it."""
        finite = lambda name: bool(np.isfinite(buf[name].read()).all())
        if np.isfinite(image).all() and finite("latents_0"):
            return
        if finite("latents_0"):
            bad = "vae_decoder"
        else:
            bad = "unet" if finite("text_embeddings") else "text_encoder"
        what, flag = self.FP32_FLAGS[bad]
        precision = mf.model_precision(self.manifest, bad)
        fix = (f"export again with {flag} (sdrt export MODEL {self.work_dir} ... {flag})" if precision == "fp16"
               else "its weights give non-finite values even in FP32")
        raise UserError(f"the {what} ({precision}) produced NaN/inf values, no image written: {fix}")

    def dims(self, height, width, batch, guidance, chunks=1) -> Dims:
        height = self.config.default_height if height is None else height
        width = self.config.default_width if width is None else width
        for what, v in (("height", height), ("width", width)):
            if v <= 0 or v % self.config.vae_factor:
                raise RequestError(what, f"{{{what}}} {v} must be a positive multiple of {self.config.vae_factor} "
                                         f"(the VAE factor of this model)")
        self.check_chunks(chunks)
        return Dims(batch, height, width, cfg=guidance > 1.0, vae_factor=self.config.vae_factor,
                    chunks=chunks, text_len=self.config.text_len)

    def check_clip_skip(self, clip_skip) -> np.ndarray:
        layers = self.config.text_layers
        if not isinstance(clip_skip, (int, np.integer)) or not 1 <= clip_skip <= layers:
            raise RequestError("clip_skip", f"{{clip_skip}} {clip_skip} must be 1..{layers} (1 = the last of "
                                            f"this text encoder's {layers} layers, 2 = the one before, ...)")
        return np.array([clip_skip], np.int32)

    def check_chunks(self, chunks: int) -> None:
        """Engines built with a fixed prompt-length range refuse longer prompts: say so first."""
        built = self.manifest.get("engines", {}).get(self.backend.name, {})
        limit = min((e["key"]["options"]["max_prompt_chunks"] for e in built.values()
                     if "max_prompt_chunks" in e["key"]["options"]), default=None)
        if limit is not None and chunks > limit:
            raise RequestError("prompt", f"the prompt needs {chunks} chunks of {self.config.text_len - 2} tokens; the "
                            f"{self.backend.name} engines take at most {limit}: run `sdrt build "
                            f"{self.work_dir} --backend {self.backend.name} --max-prompt-chunks {chunks}`")

    def initial_latents(self, dims: Dims, seed, latents) -> np.ndarray:
        shape = (dims.batch, self.config.latent_channels, dims["latent_h"], dims["latent_w"])
        if latents is None:   # DDIM's init_noise_sigma is 1: x_T ~ N(0, I)
            return seeded_noise(shape, seed)
        latents = np.asarray(latents)
        if latents.shape != shape:
            raise RequestError("latents", f"latents have shape {list(latents.shape)}, expected {list(shape)} "
                            f"for batch {dims.batch} at {dims.height}x{dims.width}")
        if not np.issubdtype(latents.dtype, np.floating) or not np.all(np.isfinite(latents)):
            raise RequestError("latents", "latents must be finite floating-point values")
        return latents.astype(np.float32)

    def plan(self, dims: Dims, variant: Variant = Variant.plain, controlnets: int = 0) -> Plan:
        key = (dims, Variant(variant), controlnets)
        if key not in self.plans:
            if self.backend.max_plans and len(self.plans) >= self.backend.max_plans:
                self.plans.clear()             # free the old plan's buffers (and sessions) first
                self.backend.drop_plans()
            self.plans[key] = self.make_plan(dims, variant, controlnets)
        return self.plans[key]

    def model(self, name: str, what: str):
        if name not in self.models:
            raise UserError(f"{self.work_dir} has no {name} model ({what}; exported by an older sdrt): "
                            f"run `sdrt export` again")
        return self.models[name]

    def make_plan(self, dims: Dims, variant: Variant = Variant.plain, controlnets: int = 0) -> Plan:
        be = self.backend
        kind = Step(variant, dims.cfg, controlnets)
        step = self.model(kind.name, "the step graph for " + " and ".join(t.value for t in kind.spec.tasks))
        te, vae = self.models["text_encoder"], self.models["vae_decoder"]
        Buffer = DeviceBuffer if be.device == "cuda" else HostBuffer
        shapes = {**te.shapes(dims), **step.shapes(dims), **vae.shapes(dims)}
        dtypes = {t.name: t.dtype for m in (te, step, vae) for t in m.tensors}
        new = lambda name, key=None: Buffer(shapes[key or name], dtypes[key or name], be.stream)
        shapes["text_embeddings"] = step.shapes(dims)["text_embeddings"]    # [text_batch, 77 k, D]
        extra = kind.extra_inputs               # the variant's inputs, bound once per call
        buf = {n: new(n) for n in ("inputs_embeds", "clip_skip", "text_embeddings", "step_table", "image", *extra)}
        buf["text_rows"] = buf["text_embeddings"].view(te.shapes(dims)["text_embeddings"])  # [text_batch k, 77, D]
        state = has_sampler_state(step)       # exports before the samplers: DDIM only
        if state:
            buf["step_noise"] = new("step_noise")
        for k in (0, 1):
            buf[f"latents_{k}"] = new(f"latents_{k}", "latents")
            buf[f"step_index_{k}"] = new(f"step_index_{k}", "step_index")
            if state:
                buf[f"x0_{k}"] = new(f"x0_{k}", "x0_prev")

        text = be.runner(te, dims).bind({"inputs_embeds": buf["inputs_embeds"], "clip_skip": buf["clip_skip"],
                                         "text_embeddings": buf["text_rows"]}, te.shapes(dims))
        step_runner = be.runner(step, dims)
        steps = []
        for k in (0, 1):                      # even steps: 0 -> 1, odd steps: 1 -> 0
            b = step_runner.bind({"latents": buf[f"latents_{k}"], "latents_next": buf[f"latents_{1 - k}"],
                                  "step_index": buf[f"step_index_{k}"],
                                  "step_index_next": buf[f"step_index_{1 - k}"],
                                  "text_embeddings": buf["text_embeddings"],
                                  "step_table": buf["step_table"],
                                  **({"x0_prev": buf[f"x0_{k}"], "x0_next": buf[f"x0_{1 - k}"],
                                      "step_noise": buf["step_noise"]} if state else {}),
                                  **{n: buf[n] for n in extra}}, step.shapes(dims))
            steps.append(b)
        launches = [be.launcher(b) for b in steps]
        if be.device == "cuda" and launches[0].graph == "none":
            import warnings
            warnings.warn(f"{be.name}: the step runs without a CUDA graph ({launches[0].error})", stacklevel=3)
        return Plan(dims, buf, text, launches, {}, self.auto_vae_batch(dims))

    def auto_vae_batch(self, dims: Dims) -> int:
        """The whole batch, unless the VAE's estimated activations exceed the free device memory's
        budget (GPU backends whose runtime sizes activations itself: ONNX Runtime)."""
        if self.backend.device != "cuda" or self.backend.activation_bytes is not None:
            return dims.batch
        per_image = vae_slices.vae_bytes_per_image(dims.height, dims.width,
                                                   mf.model_precision(self.manifest, "vae_decoder"))
        budget = int(cuda.mem_free_bytes() * vae_slices.VAE_BUDGET_FRACTION)
        return vae_slices.slice_size(dims.batch, per_image, budget)

    def vae_bindings(self, plan: Plan, dims: Dims, size: int) -> list:
        """The VAE bound over rows of latents_0 and image, `size` images a run; bound once per size."""
        if size not in plan.vae:
            vae, runs = self.models["vae_decoder"], []
            for start, n in vae_slices.slices(dims.batch, size):
                d = replace(dims, batch=n)
                rows = {"latents": Rows(plan.buf["latents_0"], start, n), "image": Rows(plan.buf["image"], start, n)}
                runs.append(self.backend.runner(vae, d).bind(rows, vae.shapes(d)))
            plan.vae[size] = runs
        return plan.vae[size]

    def timings(self, clock: Clock, t0: float, t_tok: float) -> dict:
        stages = clock.durations_ms()
        steps = [ms for label, ms in stages if label == "step"]
        t = {label: ms for label, ms in stages if label != "step"}
        return {"backend": self.backend.name, "tokenize_ms": (t_tok - t0) * 1e3,
                "text_encoder_ms": t["text_encoder"], "vae_encoder_ms": t["vae_encoder"], "steps_ms": steps,
                "unet_step_ms": float(np.median(steps)), "denoise_ms": float(sum(steps)),
                "vae_ms": t["vae"], "total_ms": (time.perf_counter() - t0) * 1e3}


def load_token_table(work_dir: Path, manifest: dict) -> np.ndarray:
    """WORK_DIR/token_embedding.npy, as `sdrt export` recorded it."""
    rec = manifest.get("token_embedding")
    if rec is None:
        raise UserError(f"{work_dir} is an export whose text encoder takes token ids: export again "
                        "(the text encoder now takes token embeddings)")
    path = Path(work_dir) / rec["file"]
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): export again") from None
    if list(table.shape) != rec["shape"] or table.dtype.name != rec["dtype"]:
        raise UserError(f"{path} is {table.dtype.name} {list(table.shape)}, the export wrote "
                        f"{rec['dtype']} {rec['shape']}: export again")
    return table


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[-1, 1] NCHW float -> [0, 255] NHWC uint8, as diffusers' postprocess (round half up)."""
    x = np.clip(image.astype(np.float32) / 2 + 0.5, 0, 1)
    return (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
