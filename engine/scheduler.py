"""DDIM (eta = 0) as diffusers' DDIMScheduler, precomputed once in numpy. No torch, no diffusers.

Notation (Song et al. 2020, "Denoising Diffusion Implicit Models", eq. 12 with σ_t = 0), with
diffusers' names on the right:
    ᾱ_t        alphas_cumprod[t]                      (alpha_prod_t)
    ᾱ_{t-1}    alphas_cumprod[prev_timestep]          (alpha_prod_t_prev)
    m          the model output (after classifier-free guidance)
    x̂0         f_θ(x_t, t), "predicted x0"            (pred_original_sample)
    ε̂          ε_θ(x_t, t), the predicted noise       (pred_epsilon)
    x_{t-1} = sqrt(ᾱ_{t-1}) x̂0 + sqrt(1 - ᾱ_{t-1}) ε̂   (prev_sample; the second term is the
                                                       "direction pointing to x_t")
Every prediction type is linear in (x_t, m):
    epsilon:       x̂0 = (x_t - sqrt(1-ᾱ_t) m) / sqrt(ᾱ_t)     ε̂ = m
    sample:        x̂0 = m                                     ε̂ = (x_t - sqrt(ᾱ_t) m) / sqrt(1-ᾱ_t)
    v_prediction:  x̂0 = sqrt(ᾱ_t) x_t - sqrt(1-ᾱ_t) m         ε̂ = sqrt(ᾱ_t) m + sqrt(1-ᾱ_t) x_t
so one row of coefficients per step (sdrt.contract.STEP_COLUMNS) drives one graph for all three.
With clip_sample, x̂0 is clipped but ε̂ is not re-derived from it (diffusers'
use_clipped_model_output=False).

Image-to-image and inpainting start part-way (diffusers' get_timesteps): of the `steps` timesteps,
the first steps - int(steps·strength) are skipped, and the image latents x0 are noised to the
first kept timestep with the forward process q(x_t | x0) (DDPM eq. 4; diffusers' add_noise):
    x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε
The step table stays that of all `steps`; the runtime starts its step counter at the first kept row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from sdrt.contract import STEP_COLUMNS, STEP_TABLE_ROWS
from sdrt.engine.request import RequestError
from sdrt.errors import UserError

INIT_NOISE_SIGMA = 1.0  # x_T ~ N(0, I): DDIM does not scale the initial noise
NO_CLIP = 3.0e38        # "clip" column when clip_sample is off; the graph computes in fp32

_CHOICES = {"beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
            "prediction_type": ("epsilon", "v_prediction", "sample"),
            "timestep_spacing": ("leading", "trailing", "linspace")}


@dataclass(frozen=True)
class DDIMConfig:
    """The keys of diffusers' DDIMScheduler config that change its output; defaults are DDIM's."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    thresholding: bool = False

    @staticmethod
    def from_json(source) -> "DDIMConfig":
        """From a diffusers scheduler_config.json (path or dict) of DDIM or another scheduler
        (SD 1.5 ships PNDM): shared keys are taken, missing ones get DDIM's defaults, other keys
        are ignored, as DDIMScheduler.from_config does."""
        if not isinstance(source, dict):
            source = read_config_json(Path(source))
        known = {f.name for f in fields(DDIMConfig)}
        kw = {k: v for k, v in source.items() if k in known and v is not None}
        if isinstance(kw.get("trained_betas"), list):
            kw["trained_betas"] = tuple(kw["trained_betas"])
        cfg = DDIMConfig(**kw)
        _check(cfg)
        return cfg


def read_config_json(path: Path) -> dict:
    """A scheduler_config.json as a dict; one-line UserError when unreadable or not an object."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read scheduler config {path}: {e}") from None
    if not isinstance(d, dict):
        raise UserError(f"scheduler config {path} is not a JSON object")
    return d


def _check(cfg: DDIMConfig) -> None:
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in _CHOICES:
            if v not in _CHOICES[f.name]:
                raise UserError(f"scheduler config: {f.name}={v!r} is not supported "
                                f"(use one of {', '.join(_CHOICES[f.name])})")
        elif f.name == "trained_betas":
            if v is not None and (not isinstance(v, tuple) or not all(map(_is_number, v))):
                raise UserError("scheduler config: trained_betas must be a list of numbers")
        elif not _same_kind(v, f.default):
            raise UserError(f"scheduler config: {f.name}={v!r} must be a {type(f.default).__name__}")
    if cfg.num_train_timesteps <= 0:
        raise UserError(f"scheduler config: num_train_timesteps={cfg.num_train_timesteps} must be positive")
    if cfg.trained_betas is not None and len(cfg.trained_betas) != cfg.num_train_timesteps:
        raise UserError(f"scheduler config: trained_betas has {len(cfg.trained_betas)} values, "
                        f"num_train_timesteps is {cfg.num_train_timesteps}")
    if cfg.thresholding:
        raise UserError("scheduler config: thresholding=true (dynamic thresholding) is not supported")


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _same_kind(v, default) -> bool:
    if isinstance(default, bool):
        return isinstance(v, bool)
    if isinstance(default, int):
        return isinstance(v, Integral) and not isinstance(v, bool)
    return _is_number(v)


# ᾱ is diffusers' float32 schedule, reproduced: its β and 1 - β are float32 tensors and torch's
# CPU cumprod accumulates in float64, rounding each ᾱ_t to float32. Near t = 0, where 1 - ᾱ_t is
# ~1e-3, that rounding moves sqrt(1 - ᾱ_t) by up to ~4e-5 (relative), so it is kept; everything
# computed from ᾱ is float64.

def _betas(cfg: DDIMConfig) -> np.ndarray:
    """β_1..β_T of the forward process, float32 as diffusers holds them."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = np.asarray(cfg.trained_betas, np.float64)
    elif cfg.beta_schedule == "linear":
        betas = np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float64)
    elif cfg.beta_schedule == "scaled_linear":      # latent diffusion: linear in sqrt(β)
        betas = np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=np.float64) ** 2
    else:   # squaredcos_cap_v2 (GLIDE / Nichol & Dhariwal cosine): β_i = min(1 - ᾱ(t2)/ᾱ(t1), 0.999)
        alpha_bar = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
        i = np.arange(n, dtype=np.float64)
        betas = np.minimum(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999)
    return betas.astype(np.float32)


def _cumprod(betas: np.ndarray) -> np.ndarray:
    """ᾱ_t = prod_{s<=t} (1 - β_s), float32 as diffusers computes it."""
    return np.cumprod(np.float32(1) - betas, dtype=np.float64).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(ᾱ) so that ᾱ_T = 0, keep ᾱ_1.
    Every operation in float32, in diffusers' order: near t = 0 the cosine schedule's 1 - ᾱ_t is
    ~1e-5, so one float32 rounding done differently moves it by ~1e-2 (relative)."""
    f32 = np.float32
    s = np.sqrt(_cumprod(betas))                                  # sqrt(ᾱ), float32
    s0, sT = s[0], s[-1]
    s = (s - sT) * (s0 / (s0 - sT))                               # shift, then scale (float32)
    a_bar = s * s
    alphas = np.concatenate([a_bar[:1], a_bar[1:] / a_bar[:-1]])   # undo the cumprod
    return (f32(1) - alphas).astype(f32)


def alphas_cumprod(cfg: DDIMConfig) -> np.ndarray:
    """ᾱ_t for t = 0..num_train_timesteps-1: diffusers' float32 values, as float64."""
    betas = _betas(cfg)
    if cfg.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return _cumprod(betas).astype(np.float64)


def timesteps(cfg: DDIMConfig, steps: int) -> np.ndarray:
    """The timesteps t visited, first to last, as DDIMScheduler.set_timesteps(steps).timesteps.

    One exception: for some step counts diffusers' "trailing" spacing appends a spurious -1
    (np.arange over a float stride); it is dropped, so there are always exactly `steps`."""
    n = cfg.num_train_timesteps
    if not isinstance(steps, Integral) or isinstance(steps, bool) or steps <= 0:
        raise UserError(f"steps must be a positive integer, got {steps!r}")
    if steps > n:
        raise UserError(f"steps {steps} exceeds the scheduler's {n} training timesteps")
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(steps) * (n // steps)).round()[::-1].astype(np.int64) + cfg.steps_offset
    else:                                                                    # trailing
        ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64)[:steps] - 1
    if ts[0] >= n:
        raise UserError(f"steps {steps} with steps_offset {cfg.steps_offset} starts at timestep {ts[0]}, "
                        f"past the last training timestep {n - 1}: use fewer steps")
    return ts


def _coefficients(prediction_type: str, a_t: np.ndarray) -> dict[str, np.ndarray]:
    """x̂0 = c_x0_x x_t + c_x0_m m and ε̂ = c_eps_x x_t + c_eps_m m (eq. 12's two predictions)."""
    sa, sb = np.sqrt(a_t), np.sqrt(1 - a_t)               # sqrt(ᾱ_t), sqrt(1 - ᾱ_t)
    zero, one = np.zeros_like(a_t), np.ones_like(a_t)
    with np.errstate(divide="ignore", invalid="ignore"):   # ᾱ_t of 0 or 1: caught by step_table
        if prediction_type == "epsilon":
            return dict(c_x0_x=1 / sa, c_x0_m=-sb / sa, c_eps_x=zero, c_eps_m=one)
        if prediction_type == "sample":
            return dict(c_x0_x=zero, c_x0_m=one, c_eps_x=1 / sb, c_eps_m=-sa / sb)
    return dict(c_x0_x=sa, c_x0_m=-sb, c_eps_x=sb, c_eps_m=sa)   # v_prediction


def step_table(cfg: DDIMConfig, steps: int, guidance: float) -> np.ndarray:
    """[STEP_TABLE_ROWS, len(STEP_COLUMNS)] float32: row i drives denoising step i, rows past
    `steps` are zero. Computed in float64 from ᾱ, rounded once."""
    ts = timesteps(cfg, steps)
    if steps > STEP_TABLE_ROWS:
        raise UserError(f"steps {steps} exceeds the engine's maximum of {STEP_TABLE_ROWS}")
    if not _is_number(guidance) or not np.isfinite(guidance):
        raise UserError(f"guidance must be a finite number, got {guidance!r}")
    a = alphas_cumprod(cfg)
    # "previous" timestep: t - T // steps, as diffusers computes it whatever the spacing; below 0
    # the last step lands on final_alpha_cumprod (ᾱ_0 := 1 with set_alpha_to_one).
    prev = ts - cfg.num_train_timesteps // steps
    final = 1.0 if cfg.set_alpha_to_one else a[0]
    a_prev = np.where(prev >= 0, a[np.maximum(prev, 0)], final)            # ᾱ_{t-1}
    # inpainting with a 4-channel UNet re-noises the known region to the next timestep of the
    # schedule after each step (the last step blends in the clean x0: ᾱ := 1)
    a_next = np.append(a[ts[1:]], 1.0)
    columns = dict(timestep=ts.astype(np.float64),
                   **_coefficients(cfg.prediction_type, a[ts]),
                   sqrt_alpha_prev=np.sqrt(a_prev),
                   sqrt_one_minus_alpha_prev=np.sqrt(1 - a_prev),
                   clip=cfg.clip_sample_range if cfg.clip_sample else NO_CLIP,
                   guidance=guidance,
                   sqrt_alpha_next=np.sqrt(a_next),
                   sqrt_one_minus_alpha_next=np.sqrt(1 - a_next),
                   model_in_scale=1.0, c_x=0.0, c_x0_prev=0.0, c_noise=0.0)   # DDIM: no other term
    rows = np.stack([np.broadcast_to(np.asarray(columns[c], np.float64), ts.shape) for c in STEP_COLUMNS], 1)
    bad = ~np.isfinite(rows).all(1)
    if bad.any():
        t = ts[bad][0]
        raise UserError(f"scheduler config: prediction_type={cfg.prediction_type!r} cannot step from "
                        f"timestep {t}, where alphas_cumprod is {a[t]:g} (rescale_betas_zero_snr or "
                        f"trained_betas): use prediction_type v_prediction")
    table = np.zeros((STEP_TABLE_ROWS, len(STEP_COLUMNS)), np.float32)
    table[:steps] = rows
    return table


def apply_step(row: np.ndarray, x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """x_{t-1} from x_t and the (guided) model output m, in float32: the reference for the ONNX
    step graph."""
    r = dict(zip(STEP_COLUMNS, np.asarray(row, np.float32)))
    x, m = np.asarray(x, np.float32), np.asarray(m, np.float32)
    x0 = np.clip(r["c_x0_x"] * x + r["c_x0_m"] * m, -r["clip"], r["clip"])   # x̂0, clipped
    eps = r["c_eps_x"] * x + r["c_eps_m"] * m                                # ε̂ (not re-derived)
    return r["sqrt_alpha_prev"] * x0 + r["sqrt_one_minus_alpha_prev"] * eps  # eq. 12, σ_t = 0


def start_index(steps: int, strength: float) -> int:
    """The first step run for `strength` (diffusers' get_timesteps): steps - int(steps·strength).
    UserError when strength is outside (0, 1] or leaves no step to run."""
    if not _is_number(strength) or not 0 < strength <= 1:
        raise UserError(f"strength {strength!r} must be in (0, 1]: the share of the steps that are run")
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise RequestError("strength", f"{{strength}} {strength:g} with {steps} steps leaves no step to run "
                                       f"(int({steps} x {strength:g}) = 0): raise {{strength}} or {{steps}}")
    return steps - kept


def add_noise(cfg: DDIMConfig, steps: int, index: int, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε at t = the timestep of step `index` (float32)."""
    a = alphas_cumprod(cfg)[timesteps(cfg, steps)[index]]
    return (np.float32(np.sqrt(a)) * x0 + np.float32(np.sqrt(1 - a)) * noise).astype(np.float32)
