"""`sdrt init DIR --arch tiny|sd15|tiny-inpaint|sd15-inpaint|tiny-upscaler|...`: random-weight pipeline folders in
the diffusers layout.

No real weights can be fetched here, so tests, the demo and speed work run on these. `sd15` has
SD 1.5's exact shapes (UNet 859.5 M parameters, CLIP ViT-L/14 text encoder, 4-channel VAE with
factor 8); `tiny` has the same structure, scaled down to run in seconds on a CPU. Both load with
diffusers' `StableDiffusionPipeline.from_pretrained`. The `-inpaint` archs are the same with a
9-channel UNet (latents, mask, masked-image latents; SD 1.5 inpainting's layout), saved as a
`StableDiffusionInpaintPipeline`. `tiny-controlnet` is `tiny` with a random-weight ControlNet for its
UNet in DIR/controlnet (a diffusers ControlNetModel folder: `sdrt export DIR WORK --controlnet
DIR/controlnet`). `tiny-upscaler` is a small StableDiffusionUpscalePipeline (the x4 upscaler's layout
with other widths and depths: sdrt.export.upscaler).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from sdrt.errors import UserError
from sdrt.fileio import atomic_dir

# SD 1.5's scheduler, as DDIM wants it (the original folder ships PNDM with the same betas).
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                      clip_sample=False, prediction_type="epsilon", timestep_spacing="leading")

ARCHS = {
    "sd15": dict(
        vocab_size=49408,
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                  projection_dim=768),
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=768, attention_head_dim=8),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                 block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4),
        dtype="float16",  # as SD 1.5's fp16 variant; exporting FP32 upcasts
    ),
    "tiny": dict(
        vocab_size=1000,
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                  projection_dim=32),
        unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                 block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4),
        dtype="float32",
    ),
}


def _inpaint(base: str) -> dict:
    spec = dict(ARCHS[base])
    spec["unet"] = {**spec["unet"], "in_channels": 9}   # latents 4 + mask 1 + masked-image latents 4
    spec["pipeline"] = "StableDiffusionInpaintPipeline"
    return spec


ARCHS["tiny-inpaint"] = _inpaint("tiny")
ARCHS["sd15-inpaint"] = _inpaint("sd15")
# "controlnet": the ControlNet's conditioning_embedding_out_channels (SD 1.5's are diffusers' default)
ARCHS["tiny-controlnet"] = {**ARCHS["tiny"], "controlnet": (8, 8, 16, 16)}
ARCHS["sd15-controlnet"] = {**ARCHS["sd15"], "controlnet": (16, 32, 96, 256)}
CONTROLNET_DIR = "controlnet"            # where init writes the ControlNet of a -controlnet arch
# The x4 upscaler's layout (StableDiffusionUpscalePipeline, sdrt.export.upscaler), small: a 3-level
# VAE (factor 4: latents at the low-resolution image's size), a 7-channel UNet whose class
# embeddings take the noise level, first level without attention, DDIM v-prediction.
ARCHS["tiny-upscaler"] = dict(
    vocab_size=1000,
    text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=32),
    unet=dict(sample_size=16, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(32, 48, 64),
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16, num_class_embeds=1000),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, block_out_channels=(32, 32, 64),
             layers_per_block=1, norm_num_groups=16, down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3),
    dtype="float32", pipeline="StableDiffusionUpscalePipeline")


def random_controlnet(unet, seed: int = 1, scale: float = 0.05, embedding_channels=(8, 8, 16, 16),
                      copy_unet: bool = False):
    """A ControlNetModel for `unet` with random weights (copy_unet: its encoder copied from the
    UNet, as ControlNet training starts). A trained ControlNet's last convolutions start at zero
    (it then adds nothing); here they are random too (normal, std `scale`), so that every residual
    changes the image and a parity test can see it."""
    import torch
    from diffusers import ControlNetModel
    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(embedding_channels),
                                   load_weights_from_unet=copy_unet)
    with torch.no_grad():
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0, scale)
            conv.bias.normal_(0, scale)
    return cn.to(unet.dtype).eval()


def build_pipeline(arch: str, seed: int = 0):
    """A diffusers StableDiffusionPipeline (or StableDiffusionInpaintPipeline for the -inpaint
    archs, StableDiffusionUpscalePipeline for tiny-upscaler) with random weights of the given
    architecture."""
    spec = ARCHS[arch]
    if spec.get("pipeline") == "StableDiffusionUpscalePipeline":
        from sdrt.export.upscaler import build_pipeline as upscaler_pipeline
        return upscaler_pipeline(spec, seed)
    return pipeline_from_spec(spec, seed)


def pipeline_from_spec(spec: dict, seed: int = 0, scheduler: dict | None = None):
    """The same from an ARCHS-like spec (text/unet/vae keyword arguments, vocab_size, dtype;
    text may set hidden_act="gelu" for an OpenCLIP-converted encoder; pipeline: the diffusers
    class, StableDiffusionPipeline by default)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdrt.export.pipeline_folder import quiet
    quiet()
    pipeline_class = getattr(diffusers, spec.get("pipeline", "StableDiffusionPipeline"))
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(vocab_size=spec["vocab_size"], bos_token_id=spec["vocab_size"] - 2,
                                 eos_token_id=spec["vocab_size"] - 1, pad_token_id=spec["vocab_size"] - 1,
                                 **spec["text"])
    dtype = getattr(torch, spec["dtype"])
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = _tokenizer(Path(tok_dir), spec["vocab_size"])
    return pipeline_class(
        vae=AutoencoderKL(**spec["vae"]).to(dtype).eval(),
        text_encoder=CLIPTextModel(text_config).to(dtype).eval(),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**spec["unet"]).to(dtype).eval(),
        scheduler=DDIMScheduler(**(scheduler or SD15_SCHEDULER)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _tokenizer(tmp: Path, vocab_size: int):
    from transformers import CLIPTokenizer

    from sdrt.export.clip_vocab import write_clip_tokenizer
    write_clip_tokenizer(tmp, vocab_size)
    return CLIPTokenizer.from_pretrained(tmp)


def init(out_dir: Path, arch: str, seed: int = 0, force: bool = False) -> Path:
    """Write the pipeline folder atomically: a temp folder beside it, renamed at the end."""
    out_dir = Path(out_dir)
    if arch not in ARCHS:
        raise UserError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists: choose a new folder or pass --force to replace it")
    with atomic_dir(out_dir) as tmp:
        pipe = build_pipeline(arch, seed)
        pipe.save_pretrained(tmp, safe_serialization=True)
        if ARCHS[arch].get("controlnet"):
            random_controlnet(pipe.unet, seed + 1, embedding_channels=ARCHS[arch]["controlnet"]).save_pretrained(Path(tmp) / CONTROLNET_DIR,
                                                                   safe_serialization=True)
    return out_dir
