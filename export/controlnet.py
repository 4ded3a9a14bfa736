"""ControlNets for `sdrt export MODEL WORK_DIR --controlnet CN_DIR [--controlnet CN_DIR2 ...]`.

A ControlNet (diffusers' ControlNetModel) is a copy of the UNet's down and mid blocks that reads a
conditioning image (edges, depth, pose, ...) and returns one residual per skip connection of the
UNet, and one for the mid block:

    (d_1 .. d_n, d_mid) = ControlNet(x_t, t, text, image)       at conditioning scale 1
    UNet skips:  h_i  <- h_i + Σ_k s_k d_i^k                     (diffusers' MultiControlNet sum)
    mid block:   h    <- h   + Σ_k s_k d_mid^k

Here: reading and checking the folders (a ControlNet fits the base when its cross-attention width
and block layout are the UNet's), the torch module that is exported (its graph keeps its weights
in controlnet_K.onnx.data, which the step graphs read in place), and the torch reference of a step
with ControlNets that the composed step graph is validated against.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sdrt.contract import ControlLayout
from sdrt.errors import UserError, first_line


def load(path: Path, unet_config=None, latent_channels: int = 4):
    """A diffusers ControlNetModel folder, or a single-file ControlNet checkpoint (the original
    layout; its config from this base's UNet config: load_single_file), float32, eval."""
    import torch
    from diffusers import ControlNetModel

    from sdrt.export import single_file
    path = Path(path)
    if single_file.is_single_file(path) and unet_config is not None:
        return load_single_file(path, unet_config, latent_channels)
    if not (path / "config.json").is_file():
        raise UserError(f"--controlnet {path}: not a diffusers ControlNetModel folder (no config.json)")
    try:
        model = ControlNetModel.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"--controlnet {path}: cannot load it as a ControlNetModel ({first_line(e)[:200]})") from None
    return model.eval()


# The UNet config keys a ControlNetModel shares (a ControlNet copies its base's encoder).
SHARED_KEYS = ("block_out_channels", "layers_per_block", "down_block_types", "only_cross_attention",
               "attention_head_dim", "num_attention_heads", "use_linear_projection", "upcast_attention",
               "norm_num_groups", "norm_eps", "act_fn", "flip_sin_to_cos", "freq_shift", "downsample_padding",
               "transformer_layers_per_block", "resnet_time_scale_shift", "mid_block_type")


def single_file_config(sd: dict, unet_config, latent_channels: int, path: Path) -> dict:
    """A ControlNetModel config for a checkpoint in the original layout (control_model.* keys, or
    none): the base UNet's encoder settings, the cross-attention width read from the checkpoint
    (a ControlNet for another base is then refused by check_fits), and the conditioning network's
    channels read from its input_hint_block convolutions: conv_in, two per level, conv_out."""
    prefix = "control_model." if any(k.startswith("control_model.") for k in sd) else ""
    hint = sorted(int(k.split(".")[-2]) for k in sd if k.startswith(prefix + "input_hint_block.")
                  and k.endswith(".weight") and getattr(sd[k], "ndim", 0) == 4)
    if not hint:
        raise UserError(f"--controlnet {path}: not a ControlNet checkpoint (no input_hint_block weights): give a "
                        f"ControlNet .safetensors/.ckpt or a diffusers ControlNetModel folder")
    convs = [sd[f"{prefix}input_hint_block.{n}.weight"] for n in hint]
    levels = (len(convs) - 2) // 2
    to_k = next((v for k, v in sd.items() if k.startswith(prefix) and k.endswith("attn2.to_k.weight")), None)
    cfg = {k: getattr(unet_config, k) for k in SHARED_KEYS if hasattr(unet_config, k)}
    return {**cfg, "_class_name": "ControlNetModel", "in_channels": latent_channels,
            "cross_attention_dim": int(to_k.shape[1]) if to_k is not None else unet_config.cross_attention_dim,
            "conditioning_channels": int(convs[0].shape[1]),
            "conditioning_embedding_out_channels": [int(convs[0].shape[0])]
                                                   + [int(convs[2 + 2 * j].shape[0]) for j in range(levels)]}


def load_single_file(path: Path, unet_config, latent_channels: int):
    """diffusers' ControlNetModel.from_single_file, offline, on a config sdrt writes (as
    sdrt.export.single_file does for whole checkpoints): nothing is fetched."""
    import json
    import tempfile

    import torch
    from diffusers import ControlNetModel

    from sdrt.export import single_file
    sd = single_file.read_checkpoint(path)
    config = single_file_config(sd, unet_config, latent_channels, path)
    single_file.go_offline()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(config))
        try:
            model = ControlNetModel.from_single_file(str(path), config=d, local_files_only=True,
                                                     torch_dtype=torch.float32)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, IndexError) as e:
            raise UserError(f"--controlnet {path}: cannot load it as a ControlNet checkpoint for this base "
                            f"({first_line(e)[:200]})") from None
    return model.float().eval()


def read_config(component: Path):
    """A component's config.json as attributes (no weights loaded)."""
    import json
    from types import SimpleNamespace
    path = Path(component) / "config.json"
    try:
        return SimpleNamespace(**json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({first_line(e)[:200]})") from None


def layout(config) -> ControlLayout:
    """The residuals of a ControlNet (or UNet) config, as diffusers' down blocks emit them: conv_in,
    then per block `layers_per_block` outputs and, but for the last block, its downsampler."""
    ch, layers = tuple(config.block_out_channels), config.layers_per_block
    down = [(ch[0], 0)]
    for i, c in enumerate(ch):
        down += [(c, i)] * (layers if isinstance(layers, int) else layers[i])
        if i < len(ch) - 1:
            down.append((c, i + 1))
    return ControlLayout(tuple(down), (ch[-1], len(ch) - 1))


def check_fits(cn, unet_config, latent_channels: int, path: Path) -> ControlLayout:
    """The ControlNet's residuals must land on this UNet's skip connections: same cross-attention
    width, same blocks, same latent channels. UserError (one line) otherwise."""
    c, u = cn.config, unet_config
    where = f"--controlnet {path}"
    if c.cross_attention_dim != u.cross_attention_dim:
        raise UserError(f"{where} is for another base model: cross-attention width {c.cross_attention_dim}, this "
                        f"UNet's is {u.cross_attention_dim} (use a ControlNet trained for this model's family)")
    for key in ("block_out_channels", "layers_per_block", "down_block_types"):
        a, b = getattr(c, key), getattr(u, key)
        if _norm(a) != _norm(b):
            raise UserError(f"{where} is for another base model: its {key} is {_show(a)}, this UNet's {_show(b)} "
                            f"(use a ControlNet trained for this model's family)")
    if c.in_channels != latent_channels:
        raise UserError(f"{where} takes {c.in_channels}-channel latents, this model has {latent_channels}")
    if getattr(c, "class_embed_type", None) or getattr(c, "addition_embed_type", None):
        raise UserError(f"{where} has extra conditioning (class/addition embeddings): not supported")
    return layout(c)


def _norm(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _show(v) -> str:
    return str(list(v)) if isinstance(v, (list, tuple)) else str(v)


def module(cn):
    """The exported torch module: (sample, t, text, image) -> (down_0 .. down_n, mid) at scale 1."""
    import torch

    class ControlNet(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond):
            down, mid = self.m(sample, timestep, encoder_hidden_states, controlnet_cond=controlnet_cond,
                               conditioning_scale=1.0, return_dict=False)
            return (*down, mid)

    return ControlNet(cn)


def step_reference(unet, controlnets, u: np.ndarray, t: np.ndarray, emb: np.ndarray, images: list,
                   scales: list, guidance: bool, cn_input: np.ndarray | None = None, weights=None) -> np.ndarray:
    """The UNet output of one step with ControlNets, in torch (diffusers' own residual plumbing):
    ControlNet k on (x, t, text, image_k), its residuals times s_k (per sample: scales[k][b]),
    summed over k, the UNet called with down_block_additional_residuals /
    mid_block_additional_residual. t: per sample [B]. cn_input: the ControlNets' latents when the
    UNet's input is more (the 9-channel inpainting UNet), else u. weights: per ControlNet, [2, ≥R]
    residual weights (row 0: the unconditional half of a CFG batch, row 1: the conditional half, or
    the whole batch without CFG; sdrt.contract.control_weights); None: ones."""
    import torch
    x = u if cn_input is None else cn_input
    two = (lambda a: np.concatenate([a, a])) if guidance else (lambda a: a)
    emb_t = torch.from_numpy(emb.astype(np.float32))
    tt = torch.from_numpy(two(np.asarray(t, np.float32)))
    down_sum, mid_sum = None, None
    with torch.no_grad():
        for k, (cn, image, scale) in enumerate(zip(controlnets, images, scales)):
            scale = np.asarray(scale, np.float32)
            w = np.ones((2, 64), np.float32) if weights is None else np.asarray(weights[k], np.float32)
            half = lambda i: (np.concatenate([scale * w[0, i], scale * w[1, i]]) if guidance else scale * w[1, i])
            s = [torch.from_numpy(half(i).astype(np.float32).reshape(-1, 1, 1, 1)) for i in range(w.shape[1])]
            down, mid = cn(torch.from_numpy(two(x)), tt, emb_t, controlnet_cond=torch.from_numpy(two(image)),
                           conditioning_scale=1.0, return_dict=False)
            down, mid = [d * s[i] for i, d in enumerate(down)], mid * s[len(down)]
            down_sum = down if down_sum is None else [a + b for a, b in zip(down_sum, down)]
            mid_sum = mid if mid_sum is None else mid_sum + mid
        return unet(torch.from_numpy(two(u)), tt, emb_t, down_block_additional_residuals=down_sum,
                    mid_block_additional_residual=mid_sum, return_dict=False)[0].numpy()
