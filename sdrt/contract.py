"""The one I/O contract per model: names, dtypes, dynamic dims.

Exporter (torch -> ONNX), builder (ONNX -> engine profiles) and runtime (buffers, bindings) all
read the same `Model` objects, serialized into WORK_DIR/manifest.json. Nothing else names a tensor.

Dims are symbolic strings resolved per run by `Dims`:
  batch       images per call (B)
  text_batch  rows of text embeddings: 2B with classifier-free guidance, else B
  text_rows   prompt chunks the text encoder runs at once: text_batch * chunks
  text_seq    conditioning length the UNet attends to: 77 * chunks (prompts of 75 * chunks tokens)
  latent_h/w  latent height/width: image size / vae_factor
  noise_steps rows of the step graph's noise buffer: the steps of a stochastic sampler, else 1
  height/width  image size in pixels
Fixed sizes (77 tokens, 768 hidden, 4 channels, ...) are plain ints taken from the model config.

The denoising step graphs are typed: each step `Model` carries its `Step(variant, guidance)`,
which owns the model's name, its extra inputs and its build flags, and the manifest records it.
Which step and which models a generation runs is decided once, here:
    Task.of(image, mask) -> Step.for_task(cfg, task, guidance) -> task_models(cfg, task, guidance)
No other stage reads a model's name or slices its inputs to learn what a step does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

from sdrt.errors import UserError

STEP_TABLE_ROWS = 1000  # max denoising steps; the step table is padded to this (static shape)
# Per-step table columns (see sdrt.engine.samplers): one row per denoising step.
# Columns were appended over time, so older exports still run (the runtime writes the columns the
# export's contract declares): the first nine are DDIM's; the next two drive the inpainting blend
# (the known region re-noised to the next timestep); the last four the other samplers (the model
# input's scale, and the coefficients of x, the previous step's x̂0 and the step's noise z).
STEP_COLUMNS = ("timestep", "c_x0_x", "c_x0_m", "c_eps_x", "c_eps_m",
                "sqrt_alpha_prev", "sqrt_one_minus_alpha_prev", "clip", "guidance",
                "sqrt_alpha_next", "sqrt_one_minus_alpha_next",
                "model_in_scale", "c_x", "c_x0_prev", "c_noise")
SAMPLER_COLUMNS = STEP_COLUMNS[11:]   # an export whose table lacks them runs DDIM only


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str                     # numpy name: float32 | float16 | int32
    shape: tuple                   # ints and dim names

    def resolve(self, dims: "Dims") -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)


@dataclass(frozen=True)
class Model:
    name: str
    onnx: str                      # file name under WORK_DIR/onnx/
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    step: "Step | None" = None     # what a denoising step graph does; None for the other models

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        return self.inputs + self.outputs

    def tensor(self, name: str) -> Tensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")

    def shapes(self, dims: "Dims") -> dict[str, tuple[int, ...]]:
        return {t.name: t.resolve(dims) for t in self.tensors}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes for this model."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in self.tensors if any(isinstance(d, str) for d in t.shape)}

    def io_json(self) -> dict:
        """The graph file and its inputs/outputs: what an engine built from it depends on."""
        return {"onnx": self.onnx,
                "inputs": [_tensor_json(t) for t in self.inputs],
                "outputs": [_tensor_json(t) for t in self.outputs]}

    def to_json(self) -> dict:
        return {**self.io_json(), **({"step": self.step.to_json()} if self.step else {})}

    @staticmethod
    def from_json(name: str, d: dict) -> "Model":
        return Model(name, d["onnx"], tuple(_tensor(t) for t in d["inputs"]),
                     tuple(_tensor(t) for t in d["outputs"]),
                     Step.from_json(d["step"]) if "step" in d else None)


def _tensor_json(t: Tensor) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


def _tensor(d: dict) -> Tensor:
    return Tensor(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class ModelConfig:
    """The numbers of a pipeline that shape its tensors (read from the diffusers configs)."""
    text_len: int = 77             # tokenizer / text encoder positions
    text_dim: int = 768            # text encoder hidden size == UNet cross-attention dim
    text_layers: int = 12          # text encoder layers: --clip-skip 1..text_layers
    vocab_size: int = 49408
    latent_channels: int = 4       # VAE latent channels == UNet out channels
    unet_channels: int = 4         # UNet in channels: 4, or 9 for inpainting UNets (latents, mask,
                                   # masked-image latents)
    vae_factor: int = 8            # image size / latent size
    sample_size: int | tuple = 64  # UNet's native latent size (512 px for SD 1.5): an int, or
                                   # (height, width) as diffusers allows ([64, 96]: 512x768 px)
    controlnets: int = 0           # ControlNets exported beside the UNet (their steps: Step.controlnets)
    class_embeds: int = 0          # the UNet's num_class_embeds (0 = none): step input class_labels
    image_channels: int = 0        # channels of a low-resolution image concatenated to the UNet's input
                                   # (3 for the x4 upscaler; 0 = none): Task.upscaling

    @property
    def sample_hw(self) -> tuple[int, int]:
        s = self.sample_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def default_height(self) -> int:
        """Image height when none is given, as diffusers: sample_size[0] * vae_factor."""
        return self.sample_hw[0] * self.vae_factor

    @property
    def default_width(self) -> int:
        return self.sample_hw[1] * self.vae_factor

    @property
    def inpainting_unet(self) -> bool:
        """A dedicated inpainting UNet: latents, mask and masked-image latents in, concatenated."""
        return self.unet_channels == 2 * self.latent_channels + 1

    @property
    def upscaler(self) -> bool:
        """A super-resolution UNet: latents and the low-resolution image in, concatenated."""
        return self.image_channels > 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["sample_size"] = self.sample_size if isinstance(self.sample_size, int) else list(self.sample_hw)
        return d

    @staticmethod
    def from_json(d: dict) -> "ModelConfig":
        # older exports also wrote the VAE's scaling_factor: the decoder graph has it folded in
        d = {k: v for k, v in d.items() if k != "scaling_factor"}
        if isinstance(d.get("sample_size"), list):
            d["sample_size"] = tuple(d["sample_size"])
        return ModelConfig(**d)


@dataclass(frozen=True)
class Dims:
    batch: int
    height: int
    width: int
    cfg: bool = True               # classifier-free guidance doubles the text/UNet batch
    vae_factor: int = 8
    chunks: int = 1                # prompt chunks of text_len tokens (long prompts: 2, 3, ...)
    text_len: int = 77
    noise_steps: int = 1           # rows of the per-step noise buffer (stochastic samplers: steps)

    def __getitem__(self, name: str) -> int:
        if name == "batch":
            return self.batch
        if name == "text_batch":
            return 2 * self.batch if self.cfg else self.batch
        if name == "text_rows":
            return self["text_batch"] * self.chunks
        if name == "text_seq":
            return self.text_len * self.chunks
        if name == "latent_h":
            return self.height // self.vae_factor
        if name == "latent_w":
            return self.width // self.vae_factor
        if name.startswith(("latent_h/", "latent_w/")):   # a UNet level's size: latent_h/4 = ceil(h / 4)
            side, div = name.split("/")
            return -(-self[side] // int(div))
        if name == "height":
            return self.height
        if name == "width":
            return self.width
        if name == "noise_steps":
            return self.noise_steps
        raise KeyError(f"unknown dim {name!r}")


def check_size(height: int, width: int, vae_factor: int) -> None:
    """Image sizes the models accept: positive multiples of the VAE factor."""
    for what, v in (("height", height), ("width", width)):
        if v <= 0 or v % vae_factor:
            raise UserError(f"{what} {v} must be a positive multiple of {vae_factor} "
                            f"(the VAE factor of this model)")


def text_encoder(cfg: ModelConfig, precision: str) -> Model:
    """Token embeddings (looked up by the runtime in WORK_DIR/token_embedding.npy; positions are
    added inside) -> the final layer norm of the hidden state `clip_skip` layers from the top
    (1 = the last layer). One row per 77-token prompt chunk."""
    f = _float(precision)
    return Model("text_encoder", "text_encoder.onnx",
                 (Tensor("inputs_embeds", f, ("text_rows", cfg.text_len, cfg.text_dim)),
                  Tensor("clip_skip", "int32", (1,))),
                 (Tensor("text_embeddings", f, ("text_rows", cfg.text_len, cfg.text_dim)),))


def unet(cfg: ModelConfig, precision: str) -> Model:
    f = _float(precision)
    c = cfg.latent_channels
    labels = (Tensor("class_labels", "int32", ("text_batch",)),) if cfg.class_embeds else ()
    return Model("unet", "unet.onnx",
                 (Tensor("sample", f, ("text_batch", cfg.unet_channels, "latent_h", "latent_w")),
                  Tensor("timestep", "float32", (1,)),
                  Tensor("encoder_hidden_states", f, ("text_batch", "text_seq", cfg.text_dim)), *labels),
                 (Tensor("noise_pred", f, ("text_batch", c, "latent_h", "latent_w")),))


@dataclass(frozen=True)
class ControlLayout:
    """What a ControlNet adds to the UNet: one residual per skip connection (its channels and UNet
    level: the size is the latent size / 2^level), in diffusers' down_block_res_samples order,
    and the mid block's. A ControlNet fits a UNet when the UNet has exactly these skips."""
    down: tuple[tuple[int, int], ...]      # (channels, level) per down residual
    mid: tuple[int, int]                   # (channels, level) of the mid-block residual

    def to_json(self) -> dict:
        return {"down": [list(d) for d in self.down], "mid": list(self.mid)}

    @staticmethod
    def from_json(d: dict) -> "ControlLayout":
        return ControlLayout(tuple(tuple(x) for x in d["down"]), tuple(d["mid"]))


def _level_shape(channels: int, level: int) -> tuple:
    s = "" if level == 0 else f"/{2 ** level}"
    return ("text_batch", channels, "latent_h" + s, "latent_w" + s)


def controlnet(cfg: ModelConfig, precision: str, k: int, layout: ControlLayout) -> Model:
    """ControlNet k: the UNet's inputs (4-channel latents) and the conditioning image in [0, 1]
    (CFG-duplicated: text_batch rows) -> its residuals at conditioning scale 1. Exported and
    validated on its own; the step graphs with ControlNets run it (its weights stay in its file)."""
    f = _float(precision)
    u = {t.name: t for t in unet(cfg, precision).inputs}
    down = tuple(Tensor(f"down_{i}", f, _level_shape(c, lv)) for i, (c, lv) in enumerate(layout.down))
    return Model(f"controlnet_{k}", f"controlnet_{k}.onnx",
                 (Tensor("sample", f, ("text_batch", cfg.latent_channels, "latent_h", "latent_w")),
                  u["timestep"], u["encoder_hidden_states"],
                  Tensor("controlnet_cond", f, ("text_batch", 3, "height", "width"))),
                 down + (Tensor("mid", f, _level_shape(*layout.mid)),))


def vae_decoder(cfg: ModelConfig, precision: str) -> Model:
    # Latents and image cross the model boundary in float32 whatever the precision: the runtime
    # keeps latents in fp32 and the casts live inside the graph.
    return Model("vae_decoder", "vae_decoder.onnx",
                 (Tensor("latents", "float32", ("batch", cfg.latent_channels, "latent_h", "latent_w")),),
                 (Tensor("image", "float32", ("batch", 3, "height", "width")),))


def vae_encoder(cfg: ModelConfig, precision: str) -> Model:
    """Image in [-1, 1] -> the posterior's mean times scaling_factor (deterministic: diffusers'
    retrieve_latents(..., sample_mode="argmax")). The runtime encodes one image per call (batch 1)
    and repeats its latents over the batch."""
    return Model("vae_encoder", "vae_encoder.onnx",
                 (Tensor("image", "float32", ("batch", 3, "height", "width")),),
                 (Tensor("latents", "float32", ("batch", cfg.latent_channels, "latent_h", "latent_w")),))


# ---- the denoising step as a type ---------------------------------------------------------------
#
#   Task (what a generation is asked)  --Step.for_task(cfg, task, guidance)-->  Step(variant, guidance)
#   Step -> its model's name, extra inputs, build flags; Model.step (recorded in the manifest)
#   task_models(cfg, task, guidance) -> the models that generation runs (build, memory, runtime)
#
# A new variant: one Variant value + its VARIANTS row here, and its graph in
# sdrt.export.compose_step.GRAPHS (with its numpy reference in sdrt.export.export.REFERENCES).

class Task(str, Enum):
    """What one generation is asked to do (which inputs it has)."""
    text_to_image = "text to image"
    image_to_image = "image to image"          # an image
    inpainting = "inpainting"                  # an image and a mask (white = repaint)
    upscaling = "upscaling"                    # a low-resolution image, on a super-resolution UNet

    @staticmethod
    def of(image: bool, mask: bool) -> "Task":
        return Task.inpainting if mask else Task.image_to_image if image else Task.text_to_image


class Variant(str, Enum):
    """What a denoising step feeds the UNet besides x_t, and what it does after the DDIM update."""
    plain = "plain"      # text to image and image to image (4-channel UNet)
    blend = "blend"      # inpainting with a 4-channel UNet: the known region, re-noised to the next
                         # timestep, replaces the step's output outside the mask
    concat = "concat"    # inpainting with a 9-channel UNet: concat(x_t, mask, masked-image latents) in
    upscale = "upscale"  # super-resolution: concat(x_t, noised low-resolution image) in, the noise
                         # level as the UNet's class labels

    @property
    def spec(self) -> "VariantSpec":
        return VARIANTS[self]

    @staticmethod
    def for_task(cfg: ModelConfig, task: Task, where: str = "this export") -> "Variant":
        """The variant a generation of `task` runs on this UNet; UserError when the UNet cannot."""
        for v in Variant:
            if v.spec.fits(cfg) and task in v.spec.tasks:
                return v
        if cfg.upscaler:
            raise UserError(f"{where} holds a super-resolution UNet ({cfg.unet_channels} input channels): it "
                            f"needs --image (the low-resolution image) and upscales it; it has no "
                            f"{task.value}")
        if cfg.inpainting_unet:
            raise UserError(f"{where} holds an inpainting UNet ({cfg.unet_channels} input channels): it needs "
                            f"--image and --mask; text to image and image to image need an export of an "
                            f"ordinary {cfg.latent_channels}-channel UNet")
        raise UserError(f"{where} has no denoising step for {task.value} (a UNet of {cfg.unet_channels} "
                        f"input channels)")


@dataclass(frozen=True)
class VariantSpec:
    name: str                          # the step model's name (+ "_cfg" with guidance)
    extra_inputs: tuple[str, ...]      # graph inputs after the four every step has (STEP_INPUTS),
                                       # bound once per call
    inpainting_unet: bool              # runs on a 9-channel inpainting UNet, else a 4-channel one
    tasks: tuple[Task, ...]            # the generations it serves
    build_flags: tuple[str, ...] = ()  # what `sdrt build` needs to make its engine
    image_unet: bool = False           # runs on a UNet with a low-resolution image concatenated

    def fits(self, cfg: ModelConfig) -> bool:
        """Whether this variant runs on the export's UNet."""
        return self.inpainting_unet == cfg.inpainting_unet and self.image_unet == cfg.upscaler


VARIANTS = {
    Variant.plain: VariantSpec("denoise_step", (), False, (Task.text_to_image, Task.image_to_image)),
    Variant.blend: VariantSpec("denoise_step_blend", ("mask", "image_latents", "noise"), False,
                               (Task.inpainting,), ("--inpaint",)),
    Variant.concat: VariantSpec("denoise_step_inpaint", ("mask", "masked_image_latents"), True,
                                (Task.inpainting,)),
    Variant.upscale: VariantSpec("denoise_step_upscale", ("low_res_image", "class_labels"), False,
                                 (Task.upscaling,), image_unet=True),
}


def step_inputs(cfg: ModelConfig, precision: str) -> dict[str, Tensor]:
    """Every tensor a step graph may take, by name: the four of every step, then the variants' own."""
    latent = ("batch", cfg.latent_channels, "latent_h", "latent_w")
    return {t.name: t for t in (
        Tensor("latents", "float32", latent),
        Tensor("text_embeddings", _float(precision), ("text_batch", "text_seq", cfg.text_dim)),
        Tensor("step_table", "float32", (STEP_TABLE_ROWS, len(STEP_COLUMNS))),
        Tensor("step_index", "int32", ("batch",)),
        Tensor("x0_prev", "float32", latent),
        Tensor("step_noise", "float32", ("batch", "noise_steps", cfg.latent_channels, "latent_h", "latent_w")),
        Tensor("mask", "float32", ("batch", 1, "latent_h", "latent_w")),
        Tensor("image_latents", "float32", latent),
        Tensor("noise", "float32", latent),
        Tensor("masked_image_latents", "float32", latent),
        # the upscaler's low-resolution image, noised ([-1, 1] + noise), at the latent size
        Tensor("low_res_image", "float32", ("batch", cfg.image_channels or 3, "latent_h", "latent_w")),
        Tensor("class_labels", "int32", ("text_batch",)),      # the UNet's class labels (noise level)
        *(Tensor(control_image(k), "float32", ("batch", 3, "height", "width")) for k in range(MAX_CONTROLNETS)))}


MAX_CONTROLNETS = 8


def control_image(k: int) -> str:
    """The step input of ControlNet k's conditioning image ([B, 3, H, W] in [0, 1], bound once per call)."""
    return f"control_image_{k}"


def control_columns(n: int) -> tuple[str, ...]:
    """Step-table columns after STEP_COLUMNS in a step with n ControlNets: ControlNet k's
    conditioning scale at that step (0 outside its step window)."""
    return tuple(f"control_scale_{k}" for k in range(n))


STEP_INPUTS = ("latents", "text_embeddings", "step_table", "step_index")   # every step's first four
# then the sampler state every step made since the samplers has (older exports: DDIM only)
SAMPLER_STATE = ("x0_prev", "step_noise")


@dataclass(frozen=True)
class Step:
    """One denoising step graph: UNet + classifier-free guidance (or not) + DDIM update, in the
    way its variant feeds and finishes it. Owns the model's name, extra inputs and build flags.
    controlnets > 0: the export's ControlNets run first in the same graph, their down/mid residuals
    (each times its step-table column control_scale_k) added into the UNet's skip connections."""
    variant: Variant
    guidance: bool
    controlnets: int = 0

    def __post_init__(self):
        object.__setattr__(self, "variant", Variant(self.variant))
        if not 0 <= self.controlnets <= MAX_CONTROLNETS:
            raise UserError(f"{self.controlnets} ControlNets: sdrt takes at most {MAX_CONTROLNETS}")

    @property
    def spec(self) -> VariantSpec:
        return self.variant.spec

    @property
    def name(self) -> str:
        control = f"_control{self.controlnets}" if self.controlnets else ""
        return self.spec.name + control + ("_cfg" if self.guidance else "")

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        """Names of the inputs bound once per call (mask, image latents, ..., control images), in
        graph order."""
        return self.spec.extra_inputs + tuple(control_image(k) for k in range(self.controlnets))

    @property
    def columns(self) -> tuple[str, ...]:
        """The step table's columns: STEP_COLUMNS, then one conditioning scale per ControlNet."""
        return STEP_COLUMNS + control_columns(self.controlnets)

    @property
    def build_flags(self) -> tuple[str, ...]:
        """The `sdrt build` flags that make this step's engine."""
        return (() if self.guidance else ("--no-guidance",)) + self.spec.build_flags

    def inputs(self, cfg: ModelConfig, precision: str) -> tuple[Tensor, ...]:
        table = step_inputs(cfg, precision)
        table["step_table"] = Tensor("step_table", "float32", (STEP_TABLE_ROWS, len(self.columns)))
        return tuple(table[n] for n in STEP_INPUTS + SAMPLER_STATE + self.extra_inputs)

    def outputs(self, cfg: ModelConfig) -> tuple[Tensor, ...]:
        latent = ("batch", cfg.latent_channels, "latent_h", "latent_w")
        return (Tensor("latents_next", "float32", latent), Tensor("step_index_next", "int32", ("batch",)),
                Tensor("x0_next", "float32", latent))

    def to_json(self) -> dict:
        return {"variant": self.variant.value, "guidance": self.guidance,
                **({"controlnets": self.controlnets} if self.controlnets else {})}

    @staticmethod
    def from_json(d: dict) -> "Step":
        return Step(Variant(d["variant"]), bool(d["guidance"]), int(d.get("controlnets", 0)))

    @staticmethod
    def every(controlnets: int = 0) -> tuple["Step", ...]:
        """Every step without ControlNet, and with `controlnets` ControlNets when that is > 0."""
        counts = (0, controlnets) if controlnets else (0,)
        return tuple(Step(v, g, n) for n in counts for v in Variant for g in (True, False))

    @staticmethod
    def of_unet(cfg: ModelConfig) -> tuple["Step", ...]:
        """The steps an export of this UNet has (a 9-channel UNet can only inpaint); with
        ControlNets, each of them also with the ControlNets."""
        return tuple(s for s in Step.every(cfg.controlnets) if s.spec.fits(cfg))

    @staticmethod
    def for_task(cfg: ModelConfig, task: Task, guidance: bool, where: str = "this export",
                 control: bool = False) -> "Step":
        """The step a generation of `task` runs on this UNet (with the export's ControlNets when
        `control`); UserError when the UNet cannot."""
        if control and not cfg.controlnets:
            raise UserError(f"{where} has no ControlNet: export with --controlnet CN_DIR to use control images")
        return Step(Variant.for_task(cfg, task, where), guidance, cfg.controlnets if control else 0)

    @staticmethod
    def named(name: str) -> "Step | None":
        """The step of that model name (manifests written before the step was recorded)."""
        return next((s for s in Step.every() if s.name == name), None)


def tasks_of_unet(cfg: ModelConfig) -> tuple[Task, ...]:
    """What an export of this UNet can generate, in Task order."""
    return tuple(t for t in Task if any(t in s.spec.tasks for s in Step.of_unet(cfg)))


def task_models(cfg: ModelConfig, task: Task, guidance: bool, control: bool = False) -> tuple[str, ...]:
    """The models one generation of `task` runs, in order: text encoder, its step (with the
    ControlNets when `control`), the VAE encoder (image inputs), the VAE decoder. UserError when
    this UNet cannot do `task`."""
    encoder = () if task in (Task.text_to_image, Task.upscaling) else ("vae_encoder",)
    return ("text_encoder", Step.for_task(cfg, task, guidance, control=control).name, *encoder, "vae_decoder")


def engine_tasks(cfg: ModelConfig, inpaint: bool = False, image_inputs: bool = True) -> tuple[Task, ...]:
    """The tasks `sdrt build` prepares engines for (and `sdrt memory` sizes): what the UNet can do;
    inpainting with a 4-channel UNet only when asked (`inpaint`: a second step engine); image
    inputs only in exports that have a VAE encoder (older exports do not)."""
    tasks = tasks_of_unet(cfg)
    return tuple(t for t in tasks if (t in (Task.text_to_image, Task.upscaling) or image_inputs)
                 and (t is not Task.inpainting or inpaint or tasks == (Task.inpainting,)))


def models_of_tasks(cfg: ModelConfig, tasks, guidance: bool, control: bool = False) -> tuple[str, ...]:
    """Every model these tasks run, each once, in run order (text encoder, steps, VAE encoder, VAE
    decoder); with `control`, the steps with the export's ControlNets instead of those without."""
    names = {n: None for t in tasks for n in task_models(cfg, t, guidance, control)}
    order = ["text_encoder", *(s.name for s in Step.every(cfg.controlnets)), "vae_encoder", "vae_decoder"]
    return tuple(sorted(names, key=order.index))


def denoise_step(cfg: ModelConfig, precision: str, guidance: bool, variant: Variant = Variant.plain,
                 controlnets: int = 0) -> Model:
    """One whole denoising step: UNet + classifier-free guidance + the sampler's update (+ the
    variant's inpainting inputs, bound once per call; + the ControlNets' residuals).

    Per sample b it reads its row `step_table[step_index[b]]` and writes `step_index + 1`, so the
    same bound buffers (ping-ponged) and one captured CUDA graph serve every step, and samples at
    different steps (rows of different requests in one shared table) can share a batch. The
    sampler's state rides along: x0_prev -> x0_next (the previous step's x̂0, ping-ponged like the
    latents) and step_noise[b, step_index[b]] (z; rows past the buffer's last read its last).
    """
    step = Step(variant, guidance, controlnets)
    return Model(step.name, step.name + ".onnx", step.inputs(cfg, precision), step.outputs(cfg), step)


def has_sampler_state(step: Model) -> bool:
    """Exports made before the samplers have neither x0_prev nor step_noise: DDIM only."""
    return all(n in {t.name for t in step.inputs} for n in SAMPLER_STATE)


def step_models(cfg: ModelConfig, precision: str) -> list[Model]:
    return [denoise_step(cfg, precision, s.guidance, s.variant, s.controlnets) for s in Step.of_unet(cfg)]


def all_models(cfg: ModelConfig, precision: str) -> dict[str, Model]:
    models = [text_encoder(cfg, precision), unet(cfg, precision), vae_decoder(cfg, precision),
              vae_encoder(cfg, precision), *step_models(cfg, precision)]
    return {m.name: m for m in models}


# What the runtime may run (the plain UNet is exported and validated, but served through the steps).
RUNTIME_MODELS = ("text_encoder", *dict.fromkeys(s.name for n in range(MAX_CONTROLNETS + 1) for s in Step.every(n)),
                  "vae_encoder", "vae_decoder")


def _float(precision: str) -> str:
    if precision not in ("fp16", "fp32"):
        raise UserError(f"unknown precision {precision!r}: use fp16 or fp32")
    return "float16" if precision == "fp16" else "float32"
