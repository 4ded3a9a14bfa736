"""Read a diffusers pipeline folder: check it is one sdrt supports, load its torch modules."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdrt.contract import ModelConfig
from sdrt.errors import UserError

COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionImg2ImgPipeline",
             "StableDiffusionUpscalePipeline")


@dataclass
class PipelineFolder:
    path: Path
    config: ModelConfig
    text_encoder: object
    unet: object
    vae: object


def quiet() -> None:
    """diffusers/transformers chatter (progress bars, casting notes) is not the user's business."""
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def read_model_index(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder: give a diffusers pipeline folder (with model_index.json)")
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"{path} is not a diffusers pipeline folder: it has no model_index.json")
    try:
        data = json.loads(index.read_text())
    except ValueError as e:
        raise UserError(f"{index} is not valid JSON ({e})") from None
    name = data.get("_class_name", "?")
    if "XL" in name:
        raise UserError(f"{path} is an SDXL pipeline ({name}): sdrt supports Stable Diffusion 1.x/2.x "
                        "(StableDiffusionPipeline) only")
    if name not in SUPPORTED:
        raise UserError(f"{path} holds a {name}: sdrt supports {', '.join(SUPPORTED)} only")
    for comp in COMPONENTS:
        if comp not in data or data[comp] in (None, [None, None]) or not (path / comp).is_dir():
            raise UserError(f"{path} is missing its {comp}/ component: a Stable Diffusion folder needs "
                            f"{', '.join(COMPONENTS)}")
    return data


def load(path: Path) -> PipelineFolder:
    """Load the three torch modules in float32 (the reference for validation and fp32 export)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdrt.export import upscaler
    path = Path(path)
    index = read_model_index(path)
    quiet()
    try:
        # eager attention traces to plain MatMul/Softmax; sdpa's mask handling traces poorly
        text = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=torch.float32,
                                             attn_implementation="eager")
        unet = UNet2DConditionModel.from_pretrained(path / "unet", dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(path / "vae", dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"cannot load the models in {path}: {str(e).splitlines()[0]}") from None
    if upscaler.is_upscaler(index):
        upscaler.check_vae_scaling(vae)
    return PipelineFolder(path, model_config(text, unet, vae, upscaler.is_upscaler(index)), text.eval(), unet.eval(),
                          vae.eval())


def check_tokenizer(path: Path, vocab_size: int, flag: str = "the tokenizer folder") -> None:
    """The tokenizer the runtime will load from `path` (sdrt.engine.tokenizer) must exist and fit
    the text encoder's token table: a missing or foreign vocabulary would give every prompt the
    same few token ids, and the same image, without any error."""
    from sdrt.engine.tokenizer import ClipTokenizer
    try:
        tok = ClipTokenizer.from_dir(path)
    except UserError as e:
        raise UserError(f"{flag}: {e}" if flag.startswith("--") else str(e)) from None
    size = tok.backend.get_vocab_size(with_added_tokens=True)
    if size != vocab_size:
        raise UserError(f"{flag} {path} has {size} tokens but the text encoder's token table has "
                        f"{vocab_size}: pass the tokenizer/ folder that belongs to this model")


def text_vocab_size(path: Path) -> int:
    """The text encoder's token table size, from its config (from_pretrained checks the weights
    against it), read before any model is loaded."""
    from sdrt.engine.scheduler import read_config_json
    size = read_config_json(Path(path) / "text_encoder" / "config.json").get("vocab_size")
    if not isinstance(size, int) or size <= 0:
        raise UserError(f"{path}/text_encoder/config.json has no vocab_size: not a CLIP text encoder folder")
    return size


def model_config(text, unet, vae, upscaler: bool = False) -> ModelConfig:
    """upscaler: a StableDiffusionUpscalePipeline's UNet (latents + low-resolution image in, the
    noise level as class labels: sdrt.export.upscaler)."""
    from sdrt.export import upscaler as sr
    u, v, t = unet.config, vae.config, text.config
    c = v.latent_channels
    image_channels = sr.check_unet(unet, c) if upscaler else 0
    if not image_channels and (u.in_channels not in (c, 2 * c + 1) or u.out_channels != c):
        raise UserError(f"UNet has {u.in_channels} input / {u.out_channels} output channels for a {c}-channel "
                        f"VAE: sdrt supports {c} in (text-to-image) or {2 * c + 1} in (inpainting: latents, "
                        f"mask, masked-image latents), {c} out")
    if u.cross_attention_dim != t.hidden_size:
        raise UserError(f"UNet cross-attention dim {u.cross_attention_dim} != text encoder width "
                        f"{t.hidden_size}: this pipeline is not supported")
    if (getattr(u, "addition_embed_type", None) or getattr(u, "class_embed_type", None)
            or (u.num_class_embeds and not image_channels)):
        raise UserError("UNet has extra conditioning (class/addition embeddings): not supported")
    return ModelConfig(text_len=t.max_position_embeddings, text_dim=t.hidden_size,
                       text_layers=t.num_hidden_layers,
                       vocab_size=t.vocab_size, latent_channels=c, unet_channels=u.in_channels,
                       vae_factor=2 ** (len(v.block_out_channels) - 1),
                       sample_size=sample_size(u.sample_size), class_embeds=int(u.num_class_embeds or 0),
                       image_channels=image_channels)


def sample_size(value) -> int | tuple:
    """UNet sample_size: an int, or [height, width] (diffusers takes both; a list sets a
    non-square default size)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return (value[0], value[1])
    raise UserError(f"UNet sample_size {value!r} is not a positive integer or [height, width]")
