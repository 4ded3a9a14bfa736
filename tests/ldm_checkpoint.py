"""Write a diffusers SD folder as one original-LDM checkpoint (what community sites distribute):
the diffusers -> LDM key mapping of UNet, VAE and CLIP / OpenCLIP text encoders, for tests.
The tests check it by round trip through diffusers' own single-file loaders."""
from __future__ import annotations

import re

import torch

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPENCLIP = "cond_stage_model.transformer.text_model.", "cond_stage_model.model."

RESNET_UNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def unet_prefixes(cfg: dict) -> list[tuple[str, str]]:
    """diffusers prefix -> LDM prefix, for SD's block structure (any depth and level count)."""
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    down_attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    out = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
           ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
           ("mid_block.attentions.0.", "middle_block.1.")]
    for j in range(2):
        out.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}."))
    for i in range(n):
        for j in range(per):
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(per + 1) * i + j + 1}.0."))
            if down_attn[i]:
                out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(per + 1) * i + j + 1}.1."))
        if i < n - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per + 1) * (i + 1)}.0.op."))
        for j in range(per + 1):
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(per + 1) * i + j}.0."))
            if up_attn[i]:
                out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(per + 1) * i + j}.1."))
        if i < n - 1:
            out.append((f"up_blocks.{i}.upsamplers.0.",
                        f"output_blocks.{(per + 1) * i + per}.{2 if up_attn[i] else 1}."))
    return out


def unet_to_ldm(state: dict, cfg: dict) -> dict:
    prefixes = sorted(unet_prefixes(cfg), key=lambda p: -len(p[0]))
    out = {}
    for k, v in state.items():
        src, dst = next(p for p in prefixes if k.startswith(p[0]))
        rest = k[len(src):]
        if ".resnets." in src:
            for a, b in RESNET_UNET:
                rest = re.sub(rf"^{a}\.", f"{b}.", rest)
        out[UNET + dst + rest] = v
    return out


def vae_to_ldm(state: dict, cfg: dict) -> dict:
    n = len(cfg["block_out_channels"])
    out = {}
    for k, v in state.items():
        k2 = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k2)
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                    lambda m: f"decoder.up.{n - 1 - int(m.group(1))}.block.", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                    lambda m: f"decoder.up.{n - 1 - int(m.group(1))}.upsample.", k2)
        k2 = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", k2)
        if "mid_block.attentions.0." in k2:
            k2 = k2.replace("mid_block.attentions.0.", "mid.attn_1.")
            k2 = (k2.replace("group_norm.", "norm.").replace("to_q.", "q.").replace("to_k.", "k.")
                  .replace("to_v.", "v.").replace("to_out.0.", "proj_out."))
            if k2.endswith("weight") and v.ndim == 2:
                v = v[:, :, None, None]                  # LDM's attention uses 1x1 convs
        out[VAE + k2] = v
    return out


def _text_state(text_encoder) -> dict:
    """transformers >= 5.6 flattens CLIPTextModel (no text_model. prefix)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in text_encoder.state_dict().items()}


def clip_to_ldm(text_encoder) -> dict:
    return {CLIP + k[len("text_model."):]: v for k, v in _text_state(text_encoder).items()
            if k.startswith("text_model.")}


def openclip_to_ldm(text_encoder, extra_layer_seed: int = 0) -> dict:
    """OpenCLIP layout. The folder's encoder holds the layers SD 2.x uses (all but the last); the
    checkpoint gets one more, unused, random resblock, as a real 2.x checkpoint has."""
    s = {k[len("text_model."):]: v for k, v in _text_state(text_encoder).items()}
    out = {OPENCLIP + "token_embedding.weight": s["embeddings.token_embedding.weight"],
           OPENCLIP + "positional_embedding": s["embeddings.position_embedding.weight"],
           OPENCLIP + "ln_final.weight": s["final_layer_norm.weight"],
           OPENCLIP + "ln_final.bias": s["final_layer_norm.bias"]}
    width = s["embeddings.token_embedding.weight"].shape[1]
    out[OPENCLIP + "text_projection"] = torch.eye(width)
    n = text_encoder.config.num_hidden_layers
    layers = [{k[len(f"encoder.layers.{i}."):]: v for k, v in s.items() if k.startswith(f"encoder.layers.{i}.")}
              for i in range(n)]
    g = torch.Generator().manual_seed(extra_layer_seed)
    layers.append({k: torch.randn(v.shape, generator=g) * 0.02 for k, v in layers[0].items()})
    for i, L in enumerate(layers):
        p = f"{OPENCLIP}transformer.resblocks.{i}."
        out[p + "attn.in_proj_weight"] = torch.cat([L[f"self_attn.{q}_proj.weight"] for q in "qkv"])
        out[p + "attn.in_proj_bias"] = torch.cat([L[f"self_attn.{q}_proj.bias"] for q in "qkv"])
        out[p + "attn.out_proj.weight"], out[p + "attn.out_proj.bias"] = L["self_attn.out_proj.weight"], L["self_attn.out_proj.bias"]
        for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[p + f"{b}.weight"], out[p + f"{b}.bias"] = L[f"{a}.weight"], L[f"{a}.bias"]
    return out


def pipeline_to_ldm(model_dir, openclip: bool, global_step: int | None = None) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    text = CLIPTextModel.from_pretrained(model_dir / "text_encoder")
    sd = {**unet_to_ldm(unet.state_dict(), dict(unet.config)), **vae_to_ldm(vae.state_dict(), dict(vae.config)),
          **(openclip_to_ldm(text) if openclip else clip_to_ldm(text))}
    sd = {k: v.detach().float().contiguous() for k, v in sd.items()}
    return sd


def save(sd: dict, path, global_step: int | None = None) -> None:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, **({"global_step": global_step} if global_step is not None else {})}, str(path))
