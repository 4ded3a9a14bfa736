"""`sdrt train-demo OUT_DIR`: train the demo model, a small latent diffusion model of sdrt.scenes.

Three stages, each a diffusers / transformers class, so OUT_DIR is an ordinary SD pipeline folder:
  1. tokenizer  CLIP-format BPE whose merges spell each caption word (one token per word)
  2. VAE        AutoencoderKL, factor 4 (32x32x3 <-> 8x8x4), trained on 16x16 crops (it is
                convolutional) with L1 + MSE + a small KL term; scaling_factor = 1 / std(latents)
  3. text + UNet  CLIPTextModel and UNet2DConditionModel trained jointly on the v-prediction loss
                (x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε, v = √ᾱ_t ε - √(1-ᾱ_t) x0 (Salimans & Ho 2022);
                L = w(t) ||v - v_θ(x_t, t, c)||², w = (min(SNR, 5) + 1) / (SNR + 1): in x0 terms
                min(SNR, 5) + 1, Min-SNR-5's cap (Hang et al. 2023) over the v-loss's floor of 1),
                the caption dropped to "" 10% of the time so classifier-free guidance works;
                sampled with an EMA of the weights.
Why v and not ε: where the image is still almost pure noise the ε-loss weighs the error of x̂0 by
SNR ≈ 0, so an ε-model never learns what the caption says about the layout; it took the shape's
position from the noise and ignored the position words (27 % position accuracy after 3800 steps).
With v and this weight, the same layout steps count fully (on a 144-scene subset: 100 % positions
after 400 steps, against 4 % for ε after 300).
Linear betas (DDPM's 1e-4..0.02): ᾱ_T ≈ 4e-5, so the first DDIM step starts from almost pure noise
and the model cannot lean on a low-frequency leak of the background colour (as it could with SD's
scaled_linear ᾱ_T ≈ 5e-3).

Reproducible: every random draw comes from generators seeded by --seed, on one thread with torch's
deterministic algorithms; the same seed gives the same weights on the same machine and torch build.
The UNet's learning rate is constant after warmup, so the models after k steps of a longer run are
exactly those of `--steps k`: the run saves them every 200 steps to `.OUT_DIR.snapshot/` beside
OUT_DIR, to look at while it trains. A finished VAE stage is kept in `.OUT_DIR.vae/` and reused by
a later run with the same seed, VAE steps and VAE config. OUT_DIR/train_demo.json records the
settings, versions, times and the loss curve.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from sdrt import scenes
from sdrt.errors import UserError
from sdrt.fileio import atomic_dir

TEXT_LEN = 16   # tokens: the longest caption is 13 with bos and eos
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon",
                 timestep_spacing="leading")
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=scenes.SIZE,
           block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=TEXT_LEN, hidden_act="quick_gelu", projection_dim=64)
UNET = dict(sample_size=scenes.SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(48, 96),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16)
DEFAULTS = dict(steps=4800, vae_steps=3000, batch=32, vae_batch=32, lr=1e-3, vae_lr=2e-3,
                drop=0.1, ema=0.998, snr_gamma=5.0, kl=1e-5, snapshot_every=200, warmup=100,
                prediction="v_prediction")
# One thread: on 2 shared cores, a 2-thread step measured 7x slower than a 1-thread one
# (2-thread workers wait on each other whenever another process holds a core).
THREADS = 1


def log(msg: str) -> None:
    print(f"[train-demo] {msg}", file=sys.stderr, flush=True)


def progress(stage: str, step: int, steps: int, loss: float, t0: float) -> None:
    """One carriage-returned line: bar, step, running loss, elapsed and remaining time."""
    done = (step + 1) / steps
    elapsed = time.perf_counter() - t0
    bar = "#" * int(30 * done)
    print(f"\r[train-demo] {stage} [{bar:<30}] {step + 1}/{steps} loss {loss:.4f} "
          f"{elapsed:5.0f}s elapsed, {elapsed / done - elapsed:5.0f}s left", end="", file=sys.stderr, flush=True)
    if step + 1 == steps:
        print(file=sys.stderr, flush=True)


# --- data ---------------------------------------------------------------------------------------

def images(scene_list) -> np.ndarray:
    """float32 [N, 3, H, W] in [-1, 1]: the diffusers VAE's input range."""
    x = np.stack([scenes.render(s) for s in scene_list]).astype(np.float32)
    return (x / 127.5 - 1.0).transpose(0, 3, 1, 2)


def token_ids(tokenizer, captions: list[str]):
    import torch
    ids = tokenizer(captions, padding="max_length", max_length=TEXT_LEN, truncation=True).input_ids
    return torch.tensor(ids, dtype=torch.long)


# --- stage 1: tokenizer --------------------------------------------------------------------------

def make_tokenizer(dir: Path):
    from transformers import CLIPTokenizer

    from sdrt.export.clip_vocab import write_word_tokenizer
    write_word_tokenizer(dir, scenes.WORDS, TEXT_LEN)
    return CLIPTokenizer.from_pretrained(dir)


# --- stage 2: VAE --------------------------------------------------------------------------------

def random_crops(x, size: int, g):
    """One random size x size crop per image (the VAE is convolutional)."""
    import torch
    n, _, h, w = x.shape
    ys = torch.randint(0, h - size + 1, (n,), generator=g).tolist()
    xs = torch.randint(0, w - size + 1, (n,), generator=g).tolist()
    return torch.stack([img[:, y:y + size, x0:x0 + size] for img, y, x0 in zip(x, ys, xs)])


def reconstruction_loss(rec, x):
    """L1 + MSE of a decoded image against the original."""
    import torch.nn.functional as F
    return F.l1_loss(rec, x) + F.mse_loss(rec, x)


def vae_loss(vae, x, kl: float, g):
    """The autoencoder's loss on images x: decode a sample z ~ q(z|x) (reparameterised, noise from g),
    reconstruction_loss + kl * KL(q(z|x) || N(0, I))."""
    import torch
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
    return reconstruction_loss(vae.decode(z).sample, x) + kl * posterior.kl().mean()


def descend(opt, sched, loss, clip=None) -> None:
    """One optimiser step on loss (the gradient norm of the parameters `clip` capped at 1), then the
    learning-rate schedule's step."""
    import torch
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    sched.step()


def running_mean(avg: float | None, value: float) -> float:
    """The progress bar's loss: an exponential moving average (0.98)."""
    return value if avg is None else 0.98 * avg + 0.02 * value


def snapshot_due(cfg: dict, step: int, steps: int) -> bool:
    """Whether a snapshot is written after this step (every cfg["snapshot_every"], not after the last)."""
    return bool(cfg.get("snapshot_every")) and (step + 1) % cfg["snapshot_every"] == 0 and step + 1 < steps


def noised(x0, noise_sched, g):
    """The forward process at a random timestep per sample: (x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε, t, ε)."""
    import torch
    t = torch.randint(0, len(noise_sched.alphas_cumprod), (len(x0),), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    return noise_sched.add_noise(x0, eps, t), t, eps


def weighted_mse(pred, target, weight):
    """Mean over the batch of weight x the per-sample mean squared error."""
    return (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()


def train_vae(data, steps: int, seed: int, cfg: dict, config: dict | None = None, crop: int = 16,
              stage: str = "vae "):
    """An AutoencoderKL (config: VAE's by default) trained on random crop x crop crops of data (float
    NCHW in [-1, 1]): cfg's vae_batch, vae_lr (one-cycle), kl."""
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(**(config or VAE))
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["vae_lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg["vae_lr"], total_steps=steps, pct_start=0.05)
    t0, avg = time.perf_counter(), None
    for step in range(steps):
        idx = torch.randint(0, len(data), (cfg["vae_batch"],), generator=g)
        loss = vae_loss(vae, random_crops(data[idx], crop, g), cfg["kl"], g)
        descend(opt, sched, loss)
        avg = running_mean(avg, loss.item())
        progress(stage, step, steps, avg, t0)
    return vae.eval()


def encode_latents(vae, data, batch: int = 256):
    """Posterior means of every training image: the UNet's x0 (before scaling)."""
    import torch
    with torch.no_grad():
        return torch.cat([vae.encode(data[i:i + batch]).latent_dist.mean for i in range(0, len(data), batch)])


def vae_psnr(vae, data, latents) -> float:
    """Reconstruction PSNR (dB, 0..255 scale) of the first 256 training images from their latents."""
    import torch
    with torch.no_grad():
        rec = vae.decode(latents[:256]).sample.clamp(-1, 1)
    mse = float(((rec - data[:256]) * 127.5).pow(2).mean())
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


# --- stage 3: text encoder + UNet ----------------------------------------------------------------

def text_model(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT)
    return CLIPTextModel(config)


def loss_weight(alphas_cumprod, t, gamma: float, prediction: str):
    """Per-sample loss weights, SNR = ᾱ_t / (1 - ᾱ_t). In x0 terms the ε-loss is SNR ||x̂0 - x0||² and
    the v-loss (SNR + 1) ||x̂0 - x0||².
    epsilon:      w = min(SNR, γ) / SNR (Min-SNR-γ): x0 weight min(SNR, γ), which vanishes at high noise
    v_prediction: w = (min(SNR, γ) + 1) / (SNR + 1): x0 weight min(SNR, γ) + 1, Min-SNR-γ's cap with the
                  v-loss's floor of 1 (Salimans & Ho's "SNR+1"): the high-noise steps, where the layout
                  (the position words) is decided, keep their weight."""
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    if prediction == "epsilon":
        return snr.clamp(max=gamma) / snr
    return (snr.clamp(max=gamma) + 1) / (snr + 1)


def ema_update(ema, model, decay: float) -> None:
    import torch
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def ema_decay(cfg: dict, step: int) -> float:
    """cfg["ema"], lower over the first steps (a warm start: the EMA follows the model early on)."""
    return min(cfg["ema"], (1 + step) / (10 + step))


def train_denoiser(latents, ids, empty_ids, tokenizer, steps: int, seed: int, cfg: dict, snapshot=None):
    """Joint CLIPTextModel + UNet2DConditionModel training; returns their EMA copies and the losses.
    snapshot(text, unet, losses) is called with the EMA models every cfg["snapshot_every"] steps."""
    import copy

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    torch.manual_seed(seed + 2)
    text, unet = text_model(tokenizer), UNet2DConditionModel(**UNET)
    ema_text, ema_unet = copy.deepcopy(text).eval(), copy.deepcopy(unet).eval()
    noise_sched = DDPMScheduler(**{k: v for k, v in scheduler_config(cfg).items() if k != "set_alpha_to_one"})
    a_bar = noise_sched.alphas_cumprod
    params = [*text.parameters(), *unet.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.01)
    # linear warmup, then constant: nothing depends on the total, so the models after k steps of a
    # longer run are exactly those of `--steps k` (the EMA does the averaging a decay would do)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / cfg["warmup"]))
    g = torch.Generator().manual_seed(seed + 3)
    t0, avg, B, losses = time.perf_counter(), None, cfg["batch"], []
    for step in range(steps):
        idx = torch.randint(0, len(latents), (B,), generator=g)
        x0, c = latents[idx], ids[idx].clone()
        c[torch.rand(B, generator=g) < cfg["drop"]] = empty_ids        # CFG: the unconditional caption
        xt, t, eps = noised(x0, noise_sched, g)                         # √ᾱ_t x0 + √(1-ᾱ_t) ε
        pred = unet(xt, t, text(c)[0]).sample                           # ε_θ(x_t, t, c) or v_θ
        target = eps if cfg["prediction"] == "epsilon" else noise_sched.get_velocity(x0, eps, t)  # v = √ᾱ ε - √(1-ᾱ) x0
        loss = weighted_mse(pred, target, loss_weight(a_bar, t, cfg["snr_gamma"], cfg["prediction"]))
        descend(opt, sched, loss, clip=params)
        decay = ema_decay(cfg, step)
        ema_update(ema_text, text, decay)
        ema_update(ema_unet, unet, decay)
        losses.append(loss.item())
        avg = running_mean(avg, losses[-1])
        progress("unet", step, steps, avg, t0)
        if snapshot and snapshot_due(cfg, step, steps):
            snapshot(ema_text, ema_unet, losses)
    return ema_text, ema_unet, losses


# --- the pipeline folder -------------------------------------------------------------------------

def scheduler_config(cfg: dict) -> dict:
    return {**SCHEDULER, "prediction_type": cfg["prediction"]}


def save_pipeline(out: Path, vae, text, unet, tokenizer, cfg: dict) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**scheduler_config(cfg)), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers saves tokenizer.json only; CLIP's own files go beside it (same BPE, any reader)
    from sdrt.export.clip_vocab import word_merges, write_vocab_merges
    write_vocab_merges(Path(out) / "tokenizer", word_merges(scenes.WORDS))


def record(seed: int, steps: int, vae_steps: int, cfg: dict, losses: list[float], t0: float,
           vae_psnr_db: float) -> dict:
    """What train_demo.json says: enough to rerun and to judge the run."""
    import diffusers
    import torch
    import transformers
    mean10 = [round(float(np.mean(losses[i:i + 10])), 5) for i in range(0, len(losses), 10)]
    return {"command": f"sdrt train-demo OUT_DIR --steps {steps} --vae-steps {vae_steps} --seed {seed}",
            "seed": seed, "steps": steps, "vae_steps": vae_steps, "settings": cfg, "threads": THREADS,
            "image_size": scenes.SIZE, "vae_reconstruction_psnr_db": round(vae_psnr_db, 2),
            "wall_seconds_since_start": round(time.perf_counter() - t0, 1),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__},
            "unet_loss_mean_per_10_steps": mean10}


def write_record(dir: Path, data: dict) -> None:
    (dir / "train_demo.json").write_text(json.dumps(data, indent=1) + "\n")


def vae_stamp(seed: int, steps: int, config: dict, **more) -> dict:
    """What a cached VAE was trained with (seed, steps, architecture and `more` settings)."""
    return {"seed": seed, "vae_steps": steps, "vae": {k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in config.items()}, **more}


def cached_vae(vae_dir: Path, stamp: dict):
    """The VAE a previous run saved in vae_dir with this same stamp, or None."""
    from diffusers import AutoencoderKL
    stamp_file = vae_dir / "trained_with.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        log(f"reusing the VAE in {vae_dir}")
        return AutoencoderKL.from_pretrained(vae_dir).eval()
    return None


def save_vae(vae_dir: Path, vae, stamp: dict):
    """vae and its stamp written atomically to vae_dir (the cache cached_vae reads); returns vae."""
    with atomic_dir(vae_dir) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / "trained_with.json").write_text(json.dumps(stamp))
    return vae


def vae_stage(vae_dir: Path, data, seed: int, steps: int, cfg: dict):
    """Train the VAE, or reuse the one a previous run with the same seed and steps saved."""
    from diffusers import AutoencoderKL
    stamp = vae_stamp(seed, steps, VAE)
    if (vae := cached_vae(vae_dir, stamp)) is not None:
        return vae
    log(f"VAE: {sum(p.numel() for p in AutoencoderKL(**VAE).parameters()) / 1e6:.2f} M parameters, "
        f"{steps} steps of {cfg['vae_batch']} crops")
    return save_vae(vae_dir, train_vae(data, steps, seed, cfg), stamp)


def train(out_dir: Path, steps: int | None = None, seed: int = 0, vae_steps: int | None = None,
          force: bool = False, **overrides) -> Path:
    """Train all three stages and write the pipeline folder atomically to out_dir."""
    import torch
    from sdrt.export.pipeline_folder import quiet
    out_dir = Path(out_dir)
    cfg = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    steps = cfg["steps"] if steps is None else steps
    vae_steps = cfg["vae_steps"] if vae_steps is None else vae_steps
    if steps < 1 or vae_steps < 1:
        raise UserError(f"--steps and --vae-steps must be at least 1 (got {steps}, {vae_steps})")
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists: choose a new folder or pass --force to replace it")
    quiet()
    t0 = time.perf_counter()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    train_scenes = scenes.split(held_out=False)
    log(f"{len(train_scenes)} training scenes ({len(scenes.split(True))} held out), seed {seed}")
    data = torch.from_numpy(images(train_scenes))
    with atomic_dir(out_dir) as tmp:
        tokenizer = make_tokenizer(tmp / "tokenizer")
        vae = vae_stage(out_dir.parent / f".{out_dir.name}.vae", data, seed, vae_steps, cfg)
        latents = encode_latents(vae, data)
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        psnr_db = vae_psnr(vae, data, latents)
        log(f"VAE reconstruction {psnr_db:.1f} dB PSNR, scaling_factor {vae.config.scaling_factor:.4f}")
        ids = token_ids(tokenizer, [s.caption for s in train_scenes])
        empty = token_ids(tokenizer, [""])[0]
        snapshot_dir = out_dir.parent / f".{out_dir.name}.snapshot"
        def snapshot(text, unet, losses):  # what `--steps len(losses)` writes, to look at while training
            save_pipeline(snapshot_dir, vae, text, unet, tokenizer, cfg)
            write_record(snapshot_dir, record(seed, len(losses), vae_steps, cfg, losses, t0, psnr_db))
        text, unet, losses = train_denoiser(latents * vae.config.scaling_factor, ids, empty, tokenizer, steps,
                                            seed, cfg, snapshot)
        log(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, text encoder "
            f"{sum(p.numel() for p in text.parameters()) / 1e6:.2f} M parameters")
        save_pipeline(tmp, vae, text, unet, tokenizer, cfg)
        write_record(tmp, record(seed, steps, vae_steps, cfg, losses, t0, psnr_db))
    return out_dir
