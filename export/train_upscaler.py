"""`sdrt train-demo OUT_DIR --stage upscaler`: the demo's ×4 upscaler, 32x32 -> 128x128.

A model of the SD ×4 upscaler's kind (diffusers' StableDiffusionUpscalePipeline folder), trained on
sdrt.scenes drawn at 4x scale (`scenes.render(scene, scale=4)`):
  1. VAE        AutoencoderKL, factor 4 (128x128x3 <-> 32x32x4), the demo VAE's layout at twice its
                width (32, 64, 64), trained on 32x32 crops of the 128x128 renders (the demo VAE,
                trained on 32x32 scenes, turns the large flat interiors of a 128x128 scene into the
                wrong colour; at the demo VAE's width it reconstructed at 29.6 dB), then its decoder
                alone on whole 128x128 scenes (finetune_decoder). Its latents are
                then rescaled (quant_conv x k, post_quant_conv / k: the same autoencoder) so that
                z * 0.08333 has unit standard deviation: diffusers' upscale pipeline forces the VAE's
                scaling_factor to 0.08333, as in stabilityai/stable-diffusion-x4-upscaler.
  2. UNet       UNet2DConditionModel, in_channels 7 = 4 latents + the 3-channel low-resolution image
                (32x32, the latent size), num_class_embeds = max_noise_level + 1: the class label is
                the noise level added to the low-resolution image by `low_res_scheduler` (DDPM,
                SD ×4's scaled_linear betas). Trained on the v-prediction loss (Salimans & Ho 2022:
                v = √ᾱ_t ε - √(1-ᾱ_t) x0; L = w(t) ||v - v_θ(x_t, t, c, y, s)||², Min-SNR-5 weights
                w = min(SNR, 5) / (SNR + 1)), on whole 32x32 latents (trained on 16x16 crops, its
                attention never saw the whole scene: flat colours drifted and square corners rounded),
                the noise level s uniform in 0..50 for half the samples (the demo runs at 20) and
                in 0..max_noise_level for the rest, the caption dropped to "" 10% of the time.
                The low-resolution input y is the 128x128 render downsampled (bicubic) or, half of
                the time, the 32x32 render itself (what the demo's text-to-image model draws).
The tokenizer and the CLIP text encoder are the base demo model's, frozen (the caption conditions
the upscaler weakly: the low-resolution image says almost everything).

Reproducible as train_demo: one thread, deterministic algorithms, every draw from seeded generators,
a constant learning rate after warmup, so a k-step snapshot (`.OUT_DIR.snapshot/`) is `--upscaler-steps k`.
"""
from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import numpy as np

from sdrt import scenes
from sdrt.errors import UserError
from sdrt.export.train_demo import (THREADS, cached_vae, descend, ema_decay, ema_update, log, noised, progress,
                                    random_crops, reconstruction_loss, running_mean, save_vae, snapshot_due,
                                    vae_stamp, weighted_mse, write_record)
from sdrt.export.train_demo import train_vae as train_demo_vae
from sdrt.fileio import atomic_dir

SCALE = 4
HIGH = scenes.SIZE * SCALE                      # 128
VAE_SCALING = 0.08333                            # diffusers' upscale pipeline sets this on every VAE
MAX_NOISE_LEVEL = 350
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="v_prediction",
                 timestep_spacing="leading")
LOW_RES_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                         beta_schedule="scaled_linear", clip_sample=False)  # SD ×4's low_res_scheduler
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=HIGH,
           block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
UNET = dict(sample_size=scenes.SIZE, in_channels=7, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
            num_class_embeds=MAX_NOISE_LEVEL + 1)
DEFAULTS = dict(upscaler_steps=14000, upscaler_vae_steps=5000, batch=8, crop=32, vae_batch=16, vae_crop=32,
                decoder_steps=400, decoder_batch=4, decoder_crop=32, decoder_lr=1e-3, low_noise_share=0.5,
                low_noise_max=50,
                lr=1e-3, vae_lr=2e-3, drop=0.1, ema=0.999, snr_gamma=5.0, kl=1e-6, snapshot_every=500,
                warmup=100, render_low_res=0.5, scenes=None)   # scenes: the first N training scenes (tests)


# --- data ---------------------------------------------------------------------------------------

def high_images(scene_list) -> np.ndarray:
    """uint8 [N, 128, 128, 3]: every scene drawn at 4x scale."""
    return np.stack([scenes.render(s, scale=SCALE) for s in scene_list])


def downsample(high: np.ndarray) -> np.ndarray:
    """uint8 [N, 32, 32, 3]: scenes.downsample of each, the evaluation's low-resolution input."""
    return np.stack([scenes.downsample(h, SCALE) for h in high])


def to_model(x: np.ndarray):
    """uint8 NHWC -> float32 NCHW tensor in [-1, 1]."""
    import torch
    return torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


# --- stage 1: VAE --------------------------------------------------------------------------------

def train_vae(high: np.ndarray, steps: int, seed: int, cfg: dict):
    """The factor-4 VAE on vae_crop x vae_crop crops of the 128x128 renders (train_demo's VAE loop)."""
    return train_demo_vae(to_model(high), steps, seed + 10, cfg, config=VAE, crop=cfg["vae_crop"],
                          stage="upscaler vae ")


def finetune_decoder(vae, high: np.ndarray, steps: int, seed: int, cfg: dict):
    """The decoder (and post_quant_conv) trained further on the frozen encoder's latents: the latent
    space the UNet learns is unchanged; decoding whole 32x32 latents (crops of decoder_crop), the
    decoder's mid-block attention learns the extent it runs at (trained on 8x8-latent crops, it
    shifted flat colours at 32x32). L1 + MSE."""
    import torch
    latents = encode(vae, high)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg["decoder_lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["decoder_lr"], total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed + 14)
    crop, t0, avg = cfg["decoder_crop"], time.perf_counter(), None
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(high), (cfg["decoder_batch"],), generator=g)
        ys = torch.randint(0, latents.shape[2] - crop + 1, (len(idx),), generator=g).tolist()
        xs = torch.randint(0, latents.shape[3] - crop + 1, (len(idx),), generator=g).tolist()
        z = torch.stack([latents[i, :, y:y + crop, x:x + crop] for i, y, x in zip(idx.tolist(), ys, xs)])
        x = torch.cat([to_model(high[i:i + 1, SCALE * y:SCALE * (y + crop), SCALE * x0:SCALE * (x0 + crop)])
                       for i, y, x0 in zip(idx.tolist(), ys, xs)])
        loss = reconstruction_loss(vae.decode(z).sample, x)
        descend(opt, sched, loss)
        avg = running_mean(avg, loss.item())
        progress("upscaler decoder", step, steps, avg, t0)
    return vae.eval()


def encode(vae, high: np.ndarray, batch: int = 32):
    """Posterior means of uint8 images [N, 128, 128, 3]."""
    import torch
    with torch.no_grad():
        return torch.cat([vae.encode(to_model(high[i:i + batch])).latent_dist.mean
                          for i in range(0, len(high), batch)])


def rescale_latents(vae, k: float) -> None:
    """The same autoencoder with latents k times larger: encoder mean x k (log-variance + 2 log k),
    decoder input / k."""
    import torch
    with torch.no_grad():
        c = vae.config.latent_channels
        vae.quant_conv.weight[:c] *= k
        vae.quant_conv.bias[:c] *= k
        vae.quant_conv.bias[c:] += 2 * float(np.log(k))
        vae.post_quant_conv.weight *= 1.0 / k
    vae.register_to_config(scaling_factor=VAE_SCALING)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 (or 0..255 float) image stacks."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


def decode_uint8(vae, latents, batch: int = 32) -> np.ndarray:
    import torch
    with torch.no_grad():
        x = torch.cat([vae.decode(latents[i:i + batch]).sample for i in range(0, len(latents), batch)])
    return ((x.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)


def vae_stage(vae_dir: Path, high: np.ndarray, seed: int, steps: int, cfg: dict):
    """Train the VAE and rescale its latents, or reuse one a previous run with the same settings saved."""
    from diffusers import AutoencoderKL
    stamp = vae_stamp(seed, steps, VAE, settings={k: cfg[k] for k in (
        "vae_batch", "vae_crop", "vae_lr", "kl", "decoder_steps", "decoder_batch", "decoder_crop", "decoder_lr")})
    if (vae := cached_vae(vae_dir, stamp)) is not None:
        return vae
    log(f"upscaler VAE: {sum(p.numel() for p in AutoencoderKL(**VAE).parameters()) / 1e6:.2f} M parameters, "
        f"{steps} steps of {cfg['vae_batch']} {cfg['vae_crop']}x{cfg['vae_crop']} crops of 128x128 scenes")
    vae = train_vae(high, steps, seed, cfg)
    z = encode(vae, high[:512])
    rescale_latents(vae, 1.0 / (VAE_SCALING * float(z.std())))
    log(f"upscaler VAE decoder: {cfg['decoder_steps']} more steps on the frozen encoder's latents of whole "
        f"128x128 scenes (the decoder's attention then sees the latent size it decodes)")
    return save_vae(vae_dir, finetune_decoder(vae, high, cfg["decoder_steps"], seed, cfg), stamp)


# --- stage 2: the upscaling UNet -----------------------------------------------------------------

def min_snr_v_weight(alphas_cumprod, t, gamma: float):
    """w(t) = min(SNR(t), γ) / (SNR(t) + 1): Min-SNR-γ weights of the v-prediction loss."""
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return snr.clamp(max=gamma) / (snr + 1)


def noise_levels(n: int, g, cfg: dict):
    """The noise level s of each sample (the class label): uniform in 0..low_noise_max for a share
    low_noise_share of the samples (where the upscaler runs: 20 by default), uniform in
    0..max_noise_level for the rest (every level the pipeline accepts stays trained)."""
    import torch
    full = torch.randint(0, MAX_NOISE_LEVEL + 1, (n,), generator=g)
    low = torch.randint(0, cfg["low_noise_max"] + 1, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < cfg["low_noise_share"], low, full)


def paired_crops(x0, low, size: int, g):
    """The same random size x size window of the latents and of the low-resolution image (equal sizes)."""
    import torch
    n, _, h, w = x0.shape
    ys = torch.randint(0, h - size + 1, (n,), generator=g).tolist()
    xs = torch.randint(0, w - size + 1, (n,), generator=g).tolist()
    crop = lambda t: torch.stack([img[:, y:y + size, x:x + size] for img, y, x in zip(t, ys, xs)])
    return crop(x0), crop(low)


def train_unet(latents, lows, caption_idx, embeds, empty, steps: int, seed: int, cfg: dict, snapshot=None):
    """latents [N, 4, 32, 32] (scaled), lows [2, N, 3, 32, 32] (downsampled, rendered), caption_idx [N]
    into embeds [C, L, 64] (the frozen text encoder's outputs), empty [L, 64]. Returns the EMA UNet."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    torch.manual_seed(seed + 12)
    unet = UNet2DConditionModel(**UNET)
    ema = copy.deepcopy(unet).eval()
    sched_train = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "set_alpha_to_one"})
    low_sched = DDPMScheduler(**LOW_RES_SCHEDULER)
    a_bar = sched_train.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / cfg["warmup"]))
    g = torch.Generator().manual_seed(seed + 13)
    t0, avg, B, losses = time.perf_counter(), None, cfg["batch"], []
    for step in range(steps):
        idx = torch.randint(0, len(latents), (B,), generator=g)
        rendered = (torch.rand(B, generator=g) < cfg["render_low_res"]).long()
        low = lows[rendered, idx]
        x0, low = paired_crops(latents[idx], low, cfg["crop"], g)
        c = embeds[caption_idx[idx]].clone()
        c[torch.rand(B, generator=g) < cfg["drop"]] = empty                 # CFG: the unconditional caption
        level = noise_levels(B, g, cfg)                                      # the noise level s (class label)
        low = low_sched.add_noise(low, torch.randn(low.shape, generator=g), level)
        xt, t, eps = noised(x0, sched_train, g)                             # √ᾱ_t x0 + √(1-ᾱ_t) ε
        v = sched_train.get_velocity(x0, eps, t)                            # √ᾱ_t ε - √(1-ᾱ_t) x0
        pred = unet(torch.cat([xt, low], dim=1), t, c, class_labels=level).sample
        loss = weighted_mse(pred, v, min_snr_v_weight(a_bar, t, cfg["snr_gamma"]))
        descend(opt, sched, loss, clip=unet.parameters())
        ema_update(ema, unet, ema_decay(cfg, step))
        losses.append(loss.item())
        avg = running_mean(avg, losses[-1])
        progress("upscaler unet", step, steps, avg, t0)
        if snapshot and snapshot_due(cfg, step, steps):
            snapshot(ema, losses)
    return ema, losses


# --- the pipeline folder -------------------------------------------------------------------------

def save_pipeline(out: Path, vae, text, unet, tokenizer, base: Path) -> None:
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                          low_res_scheduler=DDPMScheduler(**LOW_RES_SCHEDULER),
                                          scheduler=DDIMScheduler(**SCHEDULER), max_noise_level=MAX_NOISE_LEVEL)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.copytree(base / "tokenizer", Path(out) / "tokenizer", dirs_exist_ok=True)  # the base's own files


def record(seed: int, steps: int, vae_steps: int, cfg: dict, losses: list[float], t0: float,
           vae_psnr_db: float, base: Path) -> dict:
    import diffusers
    import torch
    import transformers
    mean10 = [round(float(np.mean(losses[i:i + 10])), 5) for i in range(0, len(losses), 10)]
    return {"command": f"sdrt train-demo OUT_DIR --stage upscaler --upscaler-steps {steps} "
                       f"--upscaler-vae-steps {vae_steps} --seed {seed}",
            "seed": seed, "steps": steps, "vae_steps": vae_steps, "settings": cfg, "threads": THREADS,
            "base": str(base), "low_res_size": scenes.SIZE, "image_size": HIGH,
            "prediction_type": SCHEDULER["prediction_type"], "max_noise_level": MAX_NOISE_LEVEL,
            "vae_reconstruction_psnr_db": round(vae_psnr_db, 2),
            "wall_seconds_since_start": round(time.perf_counter() - t0, 1),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__},
            "unet_loss_mean_per_10_steps": mean10}


def check_base(base: Path) -> None:
    for sub in ("tokenizer", "text_encoder"):
        if not (base / sub).is_dir():
            raise UserError(f"{base} has no {sub}/ folder: pass a demo model folder (a StableDiffusionPipeline "
                            f"folder written by `sdrt train-demo`) as the upscaler's base")


def train(out_dir: Path, base: Path, steps: int | None = None, seed: int = 0, vae_steps: int | None = None,
          force: bool = False, **overrides) -> Path:
    """Train the ×4 upscaler's VAE and UNet and write its pipeline folder atomically to out_dir; the
    tokenizer and text encoder come from the base demo model folder."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdrt.export.pipeline_folder import quiet
    out_dir, base = Path(out_dir), Path(base)
    cfg = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    steps = cfg["upscaler_steps"] if steps is None else steps
    vae_steps = cfg["upscaler_vae_steps"] if vae_steps is None else vae_steps
    if steps < 1 or vae_steps < 1:
        raise UserError(f"--upscaler-steps and --upscaler-vae-steps must be at least 1 (got {steps}, {vae_steps})")
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists: choose a new folder or pass --force to replace it")
    check_base(base)
    quiet()
    t0 = time.perf_counter()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    train_scenes = scenes.split(held_out=False)[:cfg["scenes"]]
    log(f"upscaler: {len(train_scenes)} training scenes at {HIGH}x{HIGH}, seed {seed}, base {base}")
    high = high_images(train_scenes)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    text = CLIPTextModel.from_pretrained(base / "text_encoder").eval()
    with atomic_dir(out_dir) as tmp:
        vae = vae_stage(out_dir.parent / f".{out_dir.name}.vae", high, seed, vae_steps, cfg)
        latents = encode(vae, high)
        psnr_db = psnr(decode_uint8(vae, latents[:256]), high[:256])
        log(f"upscaler VAE reconstruction {psnr_db:.1f} dB PSNR at {HIGH}x{HIGH}, latent std x scaling "
            f"{float(latents.std()) * VAE_SCALING:.3f}")
        lows = torch.stack([to_model(downsample(high)),
                            to_model(np.stack([scenes.render(s) for s in train_scenes]))])
        captions = sorted({s.caption for s in train_scenes})
        caption_idx = torch.tensor([captions.index(s.caption) for s in train_scenes])
        max_len = text.config.max_position_embeddings
        with torch.no_grad():
            ids = tokenizer(captions + [""], padding="max_length", max_length=max_len, truncation=True).input_ids
            all_embeds = text(torch.tensor(ids))[0]
        embeds, empty = all_embeds[:-1], all_embeds[-1]
        snapshot_dir = out_dir.parent / f".{out_dir.name}.snapshot"
        def snapshot(unet, losses):  # what `--upscaler-steps len(losses)` writes, to look at while training
            save_pipeline(snapshot_dir, vae, text, unet, tokenizer, base)
            write_record(snapshot_dir, record(seed, len(losses), vae_steps, cfg, losses, t0, psnr_db, base))
        log(f"upscaler UNet: {sum(p.numel() for p in __import__('diffusers').UNet2DConditionModel(**UNET).parameters()) / 1e6:.2f} M "
            f"parameters, {steps} steps of {cfg['batch']} {cfg['crop']}x{cfg['crop']} latent crops, v-prediction")
        unet, losses = train_unet(latents * VAE_SCALING, lows, caption_idx, embeds, empty, steps, seed, cfg, snapshot)
        save_pipeline(tmp, vae, text, unet, tokenizer, base)
        write_record(tmp, record(seed, steps, vae_steps, cfg, losses, t0, psnr_db, base))
    return out_dir
