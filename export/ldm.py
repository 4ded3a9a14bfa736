"""The latent-diffusion members without a text encoder: diffusers' LDMPipeline (unconditional:
UNet2DModel + VQModel), LDMSuperResolutionPipeline (UNet2DModel with the low-resolution image
concatenated + VQModel), and class-conditional UNets (num_class_embeds) of either kind.

    LDMPipeline:                 x_T ~ N(0, I);  loop: ε = unet(x_t, t);              image = vq.decode(x_0 / s)
    LDMSuperResolutionPipeline:  x_T ~ N(0, I);  loop: ε = unet(c·concat(x_t, y), t);  image = vq.decode(x_0)
    class-conditional:           ε = unet(x_t, t, class_labels)   (+ text, in an SD-layout folder)

s is the VQModel's scaling_factor (LDMPipeline divides by it, LDMSuperResolutionPipeline does not),
c the sampler's model-input scale (diffusers scales the concatenation), y the low-resolution image
in [-1, 1] at the latent size. VQModel.decode quantises first (force_not_quantize=False): each
latent vector is replaced by its nearest codebook entry (argmin of the Euclidean distance, as
diffusers' VectorQuantizer), then post_quant_conv and the decoder.

Null class: diffusers' UNets have no notion of one. sdrt follows DiT's convention, declared in the
UNet's config.json as "null_class": true: the last of the num_class_embeds rows is the null
(unconditional) class, class labels are 0..num_class_embeds-2, and guidance runs against it.
Without the key every row is a class and there is no guidance.
"""
from __future__ import annotations

from pathlib import Path

from sdrt.contract import ModelConfig
from sdrt.errors import UserError

# model_index.json class -> (its components, the VQ scaling factor applied before decoding)
PIPELINES = {"LDMPipeline": (("unet", "vqvae", "scheduler"), True),
             "LDMSuperResolutionPipeline": (("vqvae", "unet", "scheduler"), False)}
NULL_CLASS_KEY = "null_class"


def is_ldm(class_name: str) -> bool:
    return class_name in PIPELINES


def check_components(path: Path, data: dict) -> None:
    name = data["_class_name"]
    for comp in PIPELINES[name][0]:
        if comp not in data or data[comp] in (None, [None, None]) or not (path / comp).is_dir():
            raise UserError(f"{path} is missing its {comp}/ component: a {name} folder needs "
                            f"{', '.join(PIPELINES[name][0])}")


def load(path: Path, class_name: str):
    """The UNet2DModel and VQModel in float32 (text encoder None)."""
    import torch
    from diffusers import UNet2DModel, VQModel

    from sdrt.export.pipeline_folder import PipelineFolder, quiet
    quiet()
    try:
        unet = UNet2DModel.from_pretrained(path / "unet", dtype=torch.float32)
        vq = VQModel.from_pretrained(path / "vqvae", dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"cannot load the models in {path}: {str(e).splitlines()[0]}") from None
    cfg = model_config(unet, vq, class_name == "LDMSuperResolutionPipeline", path)
    folder = PipelineFolder(path, cfg, None, unet.eval(), vq.eval())
    folder.vq_scaled = PIPELINES[class_name][1]
    return folder


def class_config(unet_config, path: Path) -> dict:
    """class_embeds and null_class of a UNet (either kind): diffusers' plain class table only."""
    n = getattr(unet_config, "num_class_embeds", None) or 0
    kind = getattr(unet_config, "class_embed_type", None)
    if kind is not None:
        raise UserError(f"{path}: UNet class_embed_type {kind!r} is not supported (sdrt runs the plain class "
                        f"table: num_class_embeds with class_embed_type null)")
    null = bool(_raw_unet_config(path).get(NULL_CLASS_KEY, False))
    if null and n < 2:
        raise UserError(f"{path}/unet/config.json sets {NULL_CLASS_KEY} but num_class_embeds is {n}: "
                        f"a null class needs at least one class beside it")
    return {"class_embeds": n, "null_class": null and n > 0}


def _raw_unet_config(path: Path) -> dict:
    from sdrt.engine.scheduler import read_config_json
    f = Path(path) / "unet" / "config.json"
    return read_config_json(f) if f.is_file() else {}


def model_config(unet, vq, superres: bool, path: Path) -> ModelConfig:
    from sdrt.export.pipeline_folder import sample_size
    u, v = unet.config, vq.config
    c = v.vq_embed_dim or v.latent_channels
    image = u.in_channels - c if superres else 0
    if u.out_channels != c or (superres and image != 3) or (not superres and u.in_channels != c):
        want = f"{c} + 3 (latents and the low-resolution image)" if superres else str(c)
        raise UserError(f"{path}: UNet has {u.in_channels} input / {u.out_channels} output channels for a "
                        f"{c}-channel VQ model: sdrt supports {want} in, {c} out")
    if getattr(u, "time_embedding_type", "positional") != "positional":
        raise UserError(f"{path}: UNet time_embedding_type {u.time_embedding_type!r} is not supported "
                        "(positional only)")
    if v.norm_type != "group":
        raise UserError(f"{path}: VQModel norm_type {v.norm_type!r} is not supported (group only)")
    return ModelConfig(text_encoder="none", decoder="vq", unet_kind="unconditional", text_len=1, text_dim=1,
                       text_layers=1, vocab_size=1, latent_channels=c, unet_channels=u.in_channels,
                       vae_factor=2 ** (len(v.block_out_channels) - 1), sample_size=sample_size(u.sample_size),
                       image_channels=image, latent_multiple=2 ** (len(u.block_out_channels) - 1),
                       **class_config(u, path))


def modules():
    import torch

    class UNet(torch.nn.Module):
        """The contract's UNet inputs, by name, into either UNet kind (text and class labels where
        it takes them)."""
        def __init__(self, m, names):
            super().__init__()
            self.m, self.names = m, names

        def forward(self, *args):
            kw = dict(zip(self.names, args))
            sample, timestep = kw.pop("sample"), kw.pop("timestep")
            return self.m(sample, timestep, **kw, return_dict=False)[0]

    class VqDecoder(torch.nn.Module):
        """fp32 latents -> fp32 image in [-1, 1]: VQModel.decode(latents / s) with its quantisation
        (force_not_quantize=False), s folded in where the pipeline divides by it. The quantisation
        (distance, argmin, lookup) runs in float32 whatever the precision, on an fp32 copy of the
        codebook kept outside the module's parameters (so that an FP16 export picks the same codes)."""
        def __init__(self, m, scaled: bool):
            super().__init__()
            self.m = m
            self.inv_scale = 1.0 / m.config.scaling_factor if scaled else 1.0
            self.codebook = m.quantize.embedding.weight.detach().float().clone()

        def forward(self, latents):
            h = latents * self.inv_scale if self.inv_scale != 1.0 else latents
            b, c, hh, ww = h.shape
            z = h.permute(0, 2, 3, 1).reshape(-1, c)
            index = torch.argmin(torch.cdist(z, self.codebook), dim=1)     # nearest code per latent vector
            zq = self.codebook[index].reshape(b, hh, ww, c)
            zq = (z.reshape(b, hh, ww, c) + (zq - z.reshape(b, hh, ww, c))).permute(0, 3, 1, 2)   # as diffusers
            dtype = next(self.m.parameters()).dtype
            x = self.m.post_quant_conv(zq.to(dtype))
            return self.m.decoder(x, None).float()

    return UNet, VqDecoder


def trace_dims(cfg: ModelConfig):
    """UNet2DModel upsamples by a fixed factor 2 (diffusers passes it no skip size), so latent sides
    must be multiples of its downsampling m: traced at 2m x 3m (the Resize nodes keep scale 2, and
    the graph takes any multiple)."""
    from sdrt.contract import Dims
    m = cfg.latent_multiple
    return Dims(batch=1, height=2 * m, width=3 * m, cfg=True, vae_factor=1, text_len=cfg.text_len)


def validation_dims(cfg: ModelConfig):
    """A shape other than the traced one: 3m x 4m latents (m: the UNet's downsampling)."""
    from sdrt.contract import Dims
    m = cfg.latent_multiple
    return Dims(batch=1, height=3 * m * cfg.vae_factor, width=4 * m * cfg.vae_factor, cfg=True,
                vae_factor=cfg.vae_factor, chunks=1, text_len=cfg.text_len)


# ---- random-weight folders (sdrt init --arch tiny-ldm | tiny-ldm-sr | tiny-class-ldm) -------------

LDM_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                     clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
                     timestep_spacing="leading")
TINY = dict(
    unet=dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              attention_head_dim=8, norm_num_groups=32),
    vq=dict(block_out_channels=(32, 32, 32), layers_per_block=1, latent_channels=3, num_vq_embeddings=64,
            norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3))
ARCHS = {"tiny-ldm": dict(TINY, pipeline="LDMPipeline"),
         "tiny-ldm-sr": dict(TINY, pipeline="LDMSuperResolutionPipeline"),
         "tiny-class-ldm": dict(TINY, pipeline="LDMPipeline", classes=10)}


def random_vq(vq_kwargs: dict, seed: int = 0, code_std: float | None = None):
    """A VQModel with random weights; its codebook drawn N(0, code_std) (default: 1 / scaling_factor,
    the spread of the latents it decodes) instead of diffusers' ±1/K init, under which every code
    is nearly zero and the quantisation would hide what the latents were."""
    import torch
    from diffusers import VQModel
    torch.manual_seed(seed)
    vq = VQModel(**vq_kwargs).eval()
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_(0, code_std or 1.0 / vq.config.scaling_factor)
    return vq


def build_pipeline(spec: dict, seed: int = 0, scheduler: dict | None = None):
    """A diffusers LDMPipeline / LDMSuperResolutionPipeline of random weights from an ARCHS-like spec
    (classes N: a UNet class table of N classes and the null class, see NULL_CLASS_KEY)."""
    import diffusers
    import torch
    from diffusers import DDIMScheduler, UNet2DModel

    from sdrt.export.pipeline_folder import quiet
    quiet()
    torch.manual_seed(seed)
    vq = random_vq(spec["vq"], seed)
    c = vq.config.latent_channels
    sr = spec["pipeline"] == "LDMSuperResolutionPipeline"
    classes = spec.get("classes", 0)
    unet = UNet2DModel(in_channels=c + 3 if sr else c, out_channels=c, **spec["unet"],
                       **({"num_class_embeds": classes + 1} if classes else {})).eval()
    sched = DDIMScheduler(**(scheduler or LDM_SCHEDULER))
    cls = getattr(diffusers, spec["pipeline"])
    return cls(vqvae=vq, unet=unet, scheduler=sched)


def mark_null_class(folder: Path) -> None:
    """Declare the UNet's last class row the null class (unet/config.json: "null_class": true)."""
    import json
    f = Path(folder) / "unet" / "config.json"
    config = json.loads(f.read_text())
    config[NULL_CLASS_KEY] = True
    f.write_text(json.dumps(config, indent=2) + "\n")


def save(spec: dict, out: Path, seed: int = 0) -> None:
    pipe = build_pipeline(spec, seed)
    pipe.save_pretrained(out, safe_serialization=True)
    if spec.get("classes"):
        mark_null_class(out)
