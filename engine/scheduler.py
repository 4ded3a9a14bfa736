"""DDIM (eta = 0) as diffusers' DDIMScheduler, precomputed once in numpy. No torch.

Notation (Song et al. 2020, "Denoising Diffusion Implicit Models", eq. 12 with sigma_t = 0):
    ᾱ_t      alphas_cumprod[t]
    x̂0       predicted original sample  ("predicted x0")
    ε̂        predicted noise            ("direction pointing to x_t")
    x_{t-1} = sqrt(ᾱ_{t-1}) x̂0 + sqrt(1 - ᾱ_{t-1}) ε̂
Every prediction type is linear in (x_t, m) where m is the model output:
    epsilon:  x̂0 = (x - sqrt(1-ᾱ) m) / sqrt(ᾱ)        ε̂ = m
    sample:   x̂0 = m                                 ε̂ = (x - sqrt(ᾱ) m) / sqrt(1-ᾱ)
    v:        x̂0 = sqrt(ᾱ) x - sqrt(1-ᾱ) m           ε̂ = sqrt(ᾱ) m + sqrt(1-ᾱ) x
so one table row per step (sdrt.contract.STEP_COLUMNS) drives the same graph for all three.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from sdrt.contract import STEP_COLUMNS, STEP_TABLE_ROWS
from sdrt.errors import UserError

NO_CLIP = 3.0e38  # "clip" column when clip_sample is off: the graph computes in fp32


@dataclass(frozen=True)
class DDIMConfig:
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
        """From a diffusers scheduler_config.json (path or dict), of DDIM or another scheduler:
        shared keys are taken, missing ones get DDIM's defaults (as DDIMScheduler.from_config)."""
        if not isinstance(source, dict):
            try:
                source = json.loads(Path(source).read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read scheduler config {source}: {e}") from None
        known = {f.name for f in fields(DDIMConfig)}
        kw = {k: v for k, v in source.items() if k in known and v is not None}
        if "trained_betas" in kw:
            kw["trained_betas"] = tuple(kw["trained_betas"])
        cfg = DDIMConfig(**kw)
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.thresholding:
            raise UserError("scheduler config: thresholding=true (dynamic thresholding) is not supported")
        if self.trained_betas is None and self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise UserError(f"scheduler config: unknown beta_schedule {self.beta_schedule!r}")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise UserError(f"scheduler config: unknown prediction_type {self.prediction_type!r}")
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise UserError(f"scheduler config: unknown timestep_spacing {self.timestep_spacing!r}")


def betas(cfg: DDIMConfig) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        b = np.asarray(cfg.trained_betas, np.float64)
    elif cfg.beta_schedule == "linear":
        b = np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float64)
    elif cfg.beta_schedule == "scaled_linear":   # SD: linear in sqrt(beta)
        b = np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=np.float64) ** 2
    else:                                       # squaredcos_cap_v2: Nichol & Dhariwal cosine
        f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
        t = np.arange(n)
        b = np.minimum(1 - f((t + 1) / n) / f(t / n), 0.999)
    return b


def alphas_cumprod(cfg: DDIMConfig) -> np.ndarray:
    """ᾱ_t = prod_{s<=t} (1 - β_s), optionally rescaled to zero terminal SNR (Lin et al. 2023)."""
    b = betas(cfg)
    if cfg.rescale_betas_zero_snr:
        b = _rescale_zero_terminal_snr(b)
    return np.cumprod(1.0 - b)


def _rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    s = np.sqrt(np.cumprod(1.0 - b))
    s0, sT = s[0], s[-1]
    s = (s - sT) * s0 / (s0 - sT)
    a = s ** 2
    a = np.concatenate([a[:1], a[1:] / a[:-1]])
    return 1 - a


def timesteps(cfg: DDIMConfig, steps: int) -> np.ndarray:
    """The timesteps t_i visited, as DDIMScheduler.set_timesteps(steps).timesteps."""
    n = cfg.num_train_timesteps
    if not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise UserError(f"steps must be a positive integer, got {steps}")
    if steps > n:
        raise UserError(f"steps {steps} exceeds the scheduler's {n} training timesteps")
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        return (np.arange(steps) * (n // steps)).round()[::-1].astype(np.int64) + cfg.steps_offset
    return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1      # trailing


def step_table(cfg: DDIMConfig, steps: int, guidance: float) -> np.ndarray:
    """[STEP_TABLE_ROWS, len(STEP_COLUMNS)] float32: row i drives denoising step i."""
    a = alphas_cumprod(cfg)
    final = 1.0 if cfg.set_alpha_to_one else a[0]
    ts = timesteps(cfg, steps)
    table = np.zeros((STEP_TABLE_ROWS, len(STEP_COLUMNS)), np.float64)
    for i, t in enumerate(ts):
        prev = t - cfg.num_train_timesteps // steps          # as diffusers, whatever the spacing
        a_t, a_prev = a[t], (a[prev] if prev >= 0 else final)
        sa, sb = np.sqrt(a_t), np.sqrt(1 - a_t)
        if cfg.prediction_type == "epsilon":
            x0 = (1 / sa, -sb / sa)
            eps = (0.0, 1.0)
        elif cfg.prediction_type == "sample":
            x0 = (0.0, 1.0)
            eps = (1 / sb, -sa / sb)
        else:                                                  # v_prediction
            x0 = (sa, -sb)
            eps = (sb, sa)
        clip = cfg.clip_sample_range if cfg.clip_sample else NO_CLIP
        table[i] = (t, *x0, *eps, np.sqrt(a_prev), np.sqrt(1 - a_prev), clip, guidance)
    return table.astype(np.float32)


def apply_step(row: np.ndarray, x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """x_{t-1} from x_t and the (guided) model output m: the reference for the ONNX step graph."""
    r = dict(zip(STEP_COLUMNS, row.astype(np.float32)))
    x, m = x.astype(np.float32), m.astype(np.float32)
    x0 = np.clip(r["c_x0_x"] * x + r["c_x0_m"] * m, -r["clip"], r["clip"])   # x̂0
    eps = r["c_eps_x"] * x + r["c_eps_m"] * m                                # ε̂
    return (r["sqrt_alpha_prev"] * x0 + r["sqrt_one_minus_alpha_prev"] * eps).astype(np.float32)
