"""The Stable Diffusion x4 upscaler (diffusers' StableDiffusionUpscalePipeline) at export time.

Its folder is an SD folder with three differences the exporter reads here:
    unet/               in_channels = latent channels + 3 (x_t and the low-resolution image,
                        concatenated), num_class_embeds: the noise level is the class label
    low_res_scheduler/  a DDPMScheduler whose forward process noises the low-resolution image:
                        image_t = sqrt(ᾱ_level) image + sqrt(1 - ᾱ_level) ε      (add_noise)
    model_index.json    max_noise_level (diffusers' default 350): noise levels 0..max_noise_level
The VAE's scaling factor is 0.08333 (diffusers' pipeline sets it so, with a deprecation note,
when a folder says otherwise; sdrt does the same and says so). Its factor is 4: the latents are the
low-resolution image's size and the decoded image is 4x that.

What the runtime needs (the max noise level, the low-res scheduler's config) is recorded in the
manifest under "upscaler" (KEY); the runtime side is sdrt.engine.upscaler.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from sdrt.errors import UserError

PIPELINE = "StableDiffusionUpscalePipeline"
VAE_SCALING = 0.08333                 # diffusers' StableDiffusionUpscalePipeline forces this value
DEFAULT_MAX_NOISE_LEVEL = 350         # StableDiffusionUpscalePipeline.__init__'s default
IMAGE_CHANNELS = 3
KEY = "upscaler"                      # the manifest's record (sdrt.engine.upscaler reads it)

# stabilityai/stable-diffusion-x4-upscaler's schedulers: DDIM with v-prediction for the latents,
# DDPM for the low-resolution image's noise.
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="v_prediction",
                 timestep_spacing="leading")
LOW_RES_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                         clip_sample=True, variance_type="fixed_small")


def is_upscaler(index: dict) -> bool:
    return index.get("_class_name") == PIPELINE


def max_noise_level(index: dict, path: Path) -> int:
    level = index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL)
    if not isinstance(level, int) or isinstance(level, bool) or level < 0:
        raise UserError(f"{path}/model_index.json: max_noise_level {level!r} is not an integer >= 0")
    return level


def record(model_dir: Path, index: dict, class_embeds: int) -> dict:
    """The manifest's "upscaler" record: max noise level and the low-res scheduler's config (as
    diffusers' DDPMScheduler.from_config fills it)."""
    from diffusers import DDPMScheduler

    from sdrt.engine.scheduler import read_config_json
    model_dir = Path(model_dir)
    if not (model_dir / "low_res_scheduler").is_dir():
        raise UserError(f"{model_dir} is a {PIPELINE} folder without its low_res_scheduler/ component")
    raw = read_config_json(model_dir / "low_res_scheduler" / "scheduler_config.json")
    try:
        sched = DDPMScheduler.from_config(raw)
    except Exception as e:  # diffusers raises ValueError, NotImplementedError, ...
        raise UserError(f"low_res_scheduler config is not usable: {str(e).splitlines()[0]}") from None
    config = {k: v for k, v in dict(sched.config).items() if not k.startswith("_")}
    level = max_noise_level(index, model_dir)
    if level >= min(class_embeds, config["num_train_timesteps"]):
        raise UserError(f"{model_dir}: max_noise_level {level} needs a UNet with more than {level} class "
                        f"embeddings and low-res scheduler timesteps (it has {class_embeds} and "
                        f"{config['num_train_timesteps']})")
    return {"max_noise_level": level, "low_res_scheduler": config}


def check_vae_scaling(vae) -> None:
    """As diffusers' pipeline: a scaling factor other than 0.08333 is replaced by it (with a warning)."""
    if getattr(vae.config, "scaling_factor", None) != VAE_SCALING:
        warnings.warn(f"the upscaler's VAE scaling_factor is {vae.config.scaling_factor}: using {VAE_SCALING}, "
                      f"as diffusers' {PIPELINE} does", stacklevel=2)
        vae.register_to_config(scaling_factor=VAE_SCALING)


def check_unet(unet, latent_channels: int) -> int:
    """The UNet's image channels (3); UserError for a UNet that is not a x4 upscaler's."""
    u = unet.config
    if u.in_channels != latent_channels + IMAGE_CHANNELS or u.out_channels != latent_channels:
        raise UserError(f"the {PIPELINE}'s UNet has {u.in_channels} input / {u.out_channels} output channels: "
                        f"an upscaler's takes {latent_channels + IMAGE_CHANNELS} (latents and the RGB image) and "
                        f"gives {latent_channels}")
    if not u.num_class_embeds or getattr(u, "class_embed_type", None):
        raise UserError(f"the {PIPELINE}'s UNet has no class embedding table (num_class_embeds): "
                        f"it cannot take the noise level")
    return IMAGE_CHANNELS


def build_pipeline(spec: dict, seed: int = 0, scheduler: dict | None = None, max_noise_level: int = 350):
    """A StableDiffusionUpscalePipeline with random weights of an ARCHS-like spec (sdrt.export.init_models)."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    import tempfile

    from sdrt.export.init_models import _tokenizer
    from sdrt.export.pipeline_folder import quiet
    quiet()
    torch.manual_seed(seed)
    v = spec["vocab_size"]
    text_config = CLIPTextConfig(vocab_size=v, bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1,
                                 **spec["text"])
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = _tokenizer(Path(tok_dir), v)
    vae = AutoencoderKL(**spec["vae"], scaling_factor=VAE_SCALING).eval()
    unet = UNet2DConditionModel(**spec["unet"]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return StableDiffusionUpscalePipeline(
            vae=vae, text_encoder=CLIPTextModel(text_config).eval(), tokenizer=tokenizer, unet=unet,
            low_res_scheduler=DDPMScheduler(**LOW_RES_SCHEDULER), scheduler=DDIMScheduler(**(scheduler or SCHEDULER)),
            safety_checker=None, feature_extractor=None, watermarker=None, max_noise_level=max_noise_level)
