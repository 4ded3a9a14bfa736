"""A single-file SD 1.x / 2.x checkpoint (original LDM keys) -> a diffusers pipeline folder.

What the weights hold is read from tensor shapes; what they do not hold follows SD's conventions:

    family        cond_stage_model.transformer.*  CLIP ViT (1.x)
                  cond_stage_model.model.*        OpenCLIP (2.x): penultimate text layer, pad "!"
    UNet          block widths, layers per block, which levels attend, transformer depth,
                  context width, conv or linear projections (1.x / 2.x) from the weights;
                  heads: 8 per attention (1.x), 64 channels each (2.x); 32 norm groups
    VAE           widths, depth, latent channels from the weights; scaling 0.18215
    text encoder  width, layers, MLP width, vocabulary, positions from the weights; 64-ch heads
    prediction    1.x: epsilon; 2.x: diffusers' rule (epsilon if global_step is 875000, else
                  v_prediction), 768 px default for v, 512 px for epsilon

sdrt writes those configs into a local folder and converts with diffusers' own single-file loaders
pointed at it (`config=` a local folder, `local_files_only=True`, HF_HUB_OFFLINE=1), so nothing can
reach a model hub. A `.ckpt` is unpickled with `weights_only=True`: it cannot run code, and one that
needs more than tensors is refused.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from sdrt.errors import UserError, first_line

SUFFIXES = (".safetensors", ".ckpt")
UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPENCLIP = "cond_stage_model.transformer.text_model.", "cond_stage_model.model."
CONFIGS = {"sd1": ("sd1", "epsilon"), "sd2": ("sd2", "epsilon"), "sd2-v": ("sd2", "v_prediction")}
# SD's DDPM schedule (v1-inference.yaml / v2-inference*.yaml), as DDIM wants it
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                 clip_sample=False, timestep_spacing="leading")
# tokenizers diffusers' own single-file code uses, looked up in the local cache only
CACHED_TOKENIZERS = {"sd1": [("openai/clip-vit-large-patch14", ""),
                             ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer")],
                     "sd2": [("stabilityai/stable-diffusion-2", "tokenizer"),
                             ("stabilityai/stable-diffusion-2-1", "tokenizer")]}


def is_single_file(path: Path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


def go_offline() -> None:
    """No hub access exists: make every huggingface_hub / transformers / diffusers call local."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    if "huggingface_hub" in sys.modules:       # imported before: its constants are already read
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True


# --- reading ---------------------------------------------------------------------------------

def read_checkpoint(path: Path) -> dict:
    """name -> torch tensor. UserError for anything that is not a readable checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is not a file: give a .safetensors or .ckpt checkpoint or a diffusers folder")
    if path.suffix.lower() == ".safetensors":
        sd = _read_safetensors(path)
    else:
        sd = _read_ckpt(path)
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = {**sd["state_dict"], **({"global_step": sd["global_step"]} if "global_step" in sd else {})}
    if not isinstance(sd, dict) or not sd:
        raise UserError(f"{path} holds no tensors: expected a Stable Diffusion checkpoint")
    return sd


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:      # SafetensorError (header, truncation), OSError
        raise UserError(f"{path} is not a readable .safetensors file ({_first_line(e)}): "
                        "is it truncated, or not a checkpoint?") from None


def _read_ckpt(path: Path) -> dict:
    import pickle

    import torch
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} is a pickle that needs more than tensors to load (it could run code): "
                        "refused; convert it to .safetensors with a tool you trust") from None
    except Exception as e:      # not a zip/pickle, truncated
        raise UserError(f"{path} is not a readable .ckpt checkpoint ({_first_line(e)}): "
                        "is it truncated, or not a checkpoint?") from None


def _first_line(e: Exception) -> str:
    return first_line(e)[:160]


# --- detection -------------------------------------------------------------------------------

def family(sd: dict, path: Path) -> str:
    """sd1 or sd2 from the key layout; one line for what is not SD 1.x/2.x."""
    keys = sd.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)
    if has("conditioner.embedders.") or f"{UNET}label_emb.0.0.weight" in sd:
        raise UserError(f"{path} is an SDXL checkpoint: not supported (sdrt exports SD 1.x and 2.x)")
    if has(f"{UNET}joint_blocks.") or has("text_encoders."):
        raise UserError(f"{path} is an SD3 checkpoint: not supported (sdrt exports SD 1.x and 2.x)")
    if f"{UNET}input_blocks.0.0.weight" not in sd or not has(f"{VAE}decoder."):
        raise UserError(f"{path} is not a Stable Diffusion checkpoint: expected the original layout "
                        f"({UNET}*, {VAE}*, cond_stage_model.*)")
    if sd[f"{UNET}input_blocks.0.0.weight"].shape[1] != sd[f"{VAE}decoder.conv_in.weight"].shape[1]:
        raise UserError(f"{path} is an inpainting or otherwise conditioned checkpoint (UNet with "
                        f"{sd[f'{UNET}input_blocks.0.0.weight'].shape[1]} input channels): sdrt exports "
                        "text-to-image models only")
    if f"{CLIP}embeddings.token_embedding.weight" in sd:
        return "sd1"
    if f"{OPENCLIP}token_embedding.weight" in sd:
        return "sd2"
    raise UserError(f"{path} has no CLIP (cond_stage_model.transformer) or OpenCLIP "
                    "(cond_stage_model.model) text encoder: not an SD 1.x/2.x checkpoint")


def _count(sd: dict, prefix: str) -> int:
    """How many numbered children prefix.N. exist."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for k in sd if (m := pat.match(k))), default=-1)


def unet_levels(sd: dict) -> list[list[tuple[int, int]]]:
    """Per resolution level, per ResBlock: (output channels, transformer depth; 0 = no attention)."""
    levels, level = [], []
    for i in range(1, _count(sd, f"{UNET}input_blocks.")):
        b = f"{UNET}input_blocks.{i}."
        if f"{b}0.op.weight" in sd:                     # a Downsample closes the level
            levels.append(level)
            level = []
            continue
        depth = _count(sd, f"{b}1.transformer_blocks.") if f"{b}1.proj_in.weight" in sd else 0
        level.append((sd[f"{b}0.out_layers.3.weight"].shape[0], depth))
    return levels + [level]


def unet_config(sd: dict, fam: str, prediction: str) -> dict:
    levels = unet_levels(sd)
    per_block = {len(lv) for lv in levels}
    if len(per_block) != 1 or any(len({d for _, d in lv}) != 1 for lv in levels):
        raise UserError("the UNet's levels differ in depth or attention: not SD's block structure")
    widths = [lv[0][0] for lv in levels]
    depths = [lv[0][1] for lv in levels]
    attn = next((f"{UNET}input_blocks.{i}.1." for i in range(1, 100)
                 if f"{UNET}input_blocks.{i}.1.proj_in.weight" in sd), None)
    if attn is None:
        raise UserError("the UNet has no cross-attention: not an SD 1.x/2.x checkpoint")
    if fam == "sd2":
        if any(w % 64 for w in widths):
            raise UserError(f"UNet widths {widths} are not multiples of 64: SD 2.x's 64-channel heads "
                            "do not fit; export a diffusers folder instead")
        heads = [w // 64 for w in widths]             # diffusers' name for the head count
    else:
        heads = 8
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths]
    return {"_class_name": "UNet2DConditionModel",
            "sample_size": 96 if prediction == "v_prediction" else 64,
            "in_channels": sd[f"{UNET}input_blocks.0.0.weight"].shape[1],
            "out_channels": sd[f"{UNET}out.2.weight"].shape[0],
            "layers_per_block": per_block.pop(), "block_out_channels": widths,
            "down_block_types": down,
            "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
            "transformer_layers_per_block": _depths(depths),
            "cross_attention_dim": sd[f"{attn}transformer_blocks.0.attn2.to_k.weight"].shape[1],
            "attention_head_dim": heads, "use_linear_projection": sd[f"{attn}proj_in.weight"].ndim == 2,
            "upcast_attention": fam == "sd2", "norm_num_groups": 32}


def _depths(depths: list[int]) -> int | list:
    """Transformer blocks per attention: one number when all levels agree (SD: 1)."""
    used = {d for d in depths if d}
    return used.pop() if len(used) == 1 else [max(d, 1) for d in depths]


def vae_config(sd: dict, prediction: str) -> dict:
    e = f"{VAE}encoder."
    levels = _count(sd, f"{e}down.")
    return {"_class_name": "AutoencoderKL", "in_channels": sd[f"{e}conv_in.weight"].shape[1],
            "out_channels": sd[f"{VAE}decoder.conv_out.weight"].shape[0],
            "latent_channels": sd[f"{VAE}decoder.conv_in.weight"].shape[1],
            "block_out_channels": [sd[f"{e}down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)],
            "layers_per_block": _count(sd, f"{e}down.0.block."),
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "norm_num_groups": 32, "scaling_factor": 0.18215,
            "sample_size": 768 if prediction == "v_prediction" else 512}


def text_config(sd: dict, fam: str) -> dict:
    if fam == "sd1":
        vocab, width = sd[f"{CLIP}embeddings.token_embedding.weight"].shape
        positions = sd[f"{CLIP}embeddings.position_embedding.weight"].shape[0]
        layers = _count(sd, f"{CLIP}encoder.layers.")
        mlp = sd[f"{CLIP}encoder.layers.0.mlp.fc1.weight"].shape[0]
        act = "quick_gelu"
    else:
        vocab, width = sd[f"{OPENCLIP}token_embedding.weight"].shape
        positions = sd[f"{OPENCLIP}positional_embedding"].shape[0]
        layers = _count(sd, f"{OPENCLIP}transformer.resblocks.") - 1     # the penultimate layer
        mlp = sd[f"{OPENCLIP}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        act = "gelu"
    if width % 64:
        raise UserError(f"text encoder width {width} is not a multiple of 64 (SD's 64-channel heads)")
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": vocab,
            "hidden_size": width, "intermediate_size": mlp, "num_hidden_layers": layers,
            "num_attention_heads": width // 64, "max_position_embeddings": positions,
            "hidden_act": act, "projection_dim": width, "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1, "pad_token_id": 1, "layer_norm_eps": 1e-5}


def detect(sd: dict, path: Path, config: str | None, prediction: str | None) -> dict:
    """Everything the configs need, and the one line saying what was found."""
    fam = family(sd, path)
    how = "detected"
    if config is not None:
        if config not in CONFIGS:
            raise UserError(f"unknown --config {config!r}: use one of {', '.join(CONFIGS)}")
        forced, pred = CONFIGS[config]
        if forced != fam:
            raise UserError(f"--config {config} does not fit {path}: its text encoder is "
                            f"{'CLIP (SD 1.x)' if fam == 'sd1' else 'OpenCLIP (SD 2.x)'}")
        how = f"--config {config}"
    elif fam == "sd2":
        step = sd.get("global_step")
        pred = "epsilon" if step == 875000 else "v_prediction"      # diffusers' rule
        how = f"global_step {step}: diffusers' rule"
    else:
        pred = "epsilon"
    if prediction is not None:
        if prediction not in ("epsilon", "v_prediction"):
            raise UserError(f"unknown --prediction-type {prediction!r}: use epsilon or v_prediction")
        pred, how = prediction, "--prediction-type"
    unet, vae, text = unet_config(sd, fam, pred), vae_config(sd, pred), text_config(sd, fam)
    line = (f"detected SD {'1.x' if fam == 'sd1' else '2.x'} ({'CLIP' if fam == 'sd1' else 'OpenCLIP'} "
            f"text encoder, width {text['hidden_size']}, {text['num_hidden_layers']} layers used); "
            f"UNet widths {unet['block_out_channels']}, context {unet['cross_attention_dim']}; "
            f"VAE factor {2 ** (len(vae['block_out_channels']) - 1)}; {pred} ({how})")
    return {"family": fam, "prediction_type": pred, "unet": unet, "vae": vae, "text_encoder": text,
            "line": line}


# --- tokenizer -------------------------------------------------------------------------------

def tokenizer(fam: str, tokenizer_dir: Path | None, vocab_size: int):
    """A CLIPTokenizer from --tokenizer DIR, else from the local Hugging Face cache, checked
    against the checkpoint's token table (transformers makes a 2-token tokenizer from an empty
    folder); 2.x pads with "!" (OpenCLIP), 1.x with <|endoftext|>."""
    from transformers import CLIPTokenizer

    from sdrt.export.pipeline_folder import check_tokenizer
    if tokenizer_dir is None:
        tokenizer_dir = _cached_tokenizer(fam)
    elif not Path(tokenizer_dir).is_dir():
        raise UserError(f"--tokenizer {tokenizer_dir} is not a folder: pass the tokenizer/ folder of a "
                        "diffusers SD folder")
    check_tokenizer(Path(tokenizer_dir), vocab_size, "--tokenizer")
    try:
        tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as e:
        raise UserError(f"--tokenizer {tokenizer_dir} is not a CLIP tokenizer folder ({_first_line(e)}): "
                        "pass the tokenizer/ folder of a diffusers SD folder") from None
    tok.pad_token = "!" if fam == "sd2" else "<|endoftext|>"
    return tok


def _cached_tokenizer(fam: str) -> Path:
    from huggingface_hub import snapshot_download
    for repo, sub in CACHED_TOKENIZERS[fam]:
        try:
            root = Path(snapshot_download(repo, local_files_only=True,
                                          allow_patterns=[f"{sub}/*" if sub else "*.json", "*.txt"]))
        except Exception:
            continue
        if (root / sub / "vocab.json").is_file() or (root / sub / "tokenizer.json").is_file():
            return root / sub
    raise UserError("a single-file checkpoint carries no tokenizer and none is in the local Hugging Face "
                    f"cache ({CACHED_TOKENIZERS[fam][0][0]}): pass --tokenizer DIR, the tokenizer/ folder "
                    "of any diffusers SD folder")


# --- conversion ------------------------------------------------------------------------------

def write_configs(found: dict, tok, out: Path) -> None:
    """A diffusers folder without weights: what diffusers' single-file loaders read as `config=`."""
    from sdrt.fileio import write_json_atomic
    out.mkdir(parents=True)
    for comp in ("unet", "vae", "text_encoder"):
        (out / comp).mkdir()
        write_json_atomic(out / comp / "config.json", found[comp])
    (out / "scheduler").mkdir()
    write_json_atomic(out / "scheduler" / "scheduler_config.json",
                      {"_class_name": "DDIMScheduler", **SCHEDULER, "prediction_type": found["prediction_type"]})
    tok.save_pretrained(str(out / "tokenizer"))
    write_json_atomic(out / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
        "feature_extractor": [None, None], "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]})


def text_checkpoint(sd: dict, found: dict) -> dict:
    """The text encoder's keys as diffusers' converter takes them: for OpenCLIP, the layers past
    the penultimate one are left out (diffusers' own list only names SD 2's layer 23)."""
    if found["family"] == "sd1":
        return {k: v for k, v in sd.items() if k.startswith(CLIP)}
    used = found["text_encoder"]["num_hidden_layers"]
    pat = re.compile(re.escape(f"{OPENCLIP}transformer.resblocks.") + r"(\d+)\.")
    return {k: v for k, v in sd.items() if k.startswith(OPENCLIP)
            and not ((m := pat.match(k)) and int(m.group(1)) >= used)}


def convert(sd: dict, found: dict, config_dir: Path, out: Path) -> None:
    """diffusers' single-file loaders, fed sdrt's local configs -> a complete pipeline folder."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    from sdrt.export.pipeline_folder import quiet
    quiet()
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    local = dict(config=str(config_dir), local_files_only=True, torch_dtype=torch.float32)
    try:
        unet = UNet2DConditionModel.from_single_file(sd, subfolder="unet", **local)
        vae = AutoencoderKL.from_single_file(sd, subfolder="vae", **local)
        text = create_diffusers_clip_model_from_ldm(CLIPTextModel, text_checkpoint(sd, found),
                                                    subfolder="text_encoder", **local)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"the checkpoint's weights do not fit the detected SD layout ({_first_line(e)}): "
                        "try --config sd1|sd2|sd2-v") from None
    shutil.copytree(config_dir, out)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        shutil.rmtree(out / name)
        module.save_pretrained(str(out / name), safe_serialization=True)


def to_folder(path: Path, out: Path, tokenizer_dir: Path | None = None, config: str | None = None,
              prediction: str | None = None, say=print) -> dict:
    """Checkpoint file -> diffusers pipeline folder `out` (created). Returns what was detected."""
    go_offline()
    sd = read_checkpoint(path)
    found = detect(sd, Path(path), config, prediction)
    tok = tokenizer(found["family"], tokenizer_dir, found["text_encoder"]["vocab_size"])
    say(found["line"] + ": converting with diffusers' single-file loaders (offline) ...")
    config_dir = out.with_name(out.name + ".configs")
    write_configs(found, tok, config_dir)
    convert(sd, found, config_dir, out)
    return {k: found[k] for k in ("family", "prediction_type", "line")}
