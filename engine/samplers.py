"""Every sampler as one row of coefficients per step, precomputed in numpy from the folder's
scheduler config (as diffusers' scheduler classes take it with `from_config`). No torch, no diffusers.

One step form serves them all (the step graph, export/compose_step.py; reference: `apply_row`):
    u       = model_in_scale · x                       the UNet's input (Euler: 1/sqrt(σ² + 1))
    m       = UNet(u, timestep)  (+ CFG)               timestep is a float (Karras σ fall between)
    x̂0      = clip(c_x0_x x + c_x0_m m)                predicted x0 (DPM-Solver's "data prediction")
    ε̂       = c_eps_x x + c_eps_m m                    predicted noise / Euler's derivative dx/dσ
    x'      = sqrt_alpha_prev x̂0 + sqrt_one_minus_alpha_prev ε̂      DDIM's arithmetic, unchanged
            + c_x x + c_x0_prev x̂0_prev + c_noise z                  then the other samplers' terms
x̂0_prev is the previous step's x̂0 (a device buffer the graph reads and writes), z ~ N(0, I) the
step's noise. For DDIM the three added coefficients are 0, so its images are bit-identical to a
step without them. The column names are DDIM's; for the others "sqrt_alpha_prev" is simply the
coefficient of x̂0 and "sqrt_one_minus_alpha_prev" that of ε̂.

Per sampler (σ = sqrt((1 - ᾱ)/ᾱ); i the step, σ_i its sigma, σ_{i+1} the next, 0 after the last):
  ddim          Song et al. eq. 12, η = 0 (sdrt.engine.scheduler)
  ddpm          Ho et al. eq. 7: x' = ĉ0 x̂0 + ĉt x + σ̃ z, σ̃² = (1-ᾱ_prev)/(1-ᾱ_t) β_t (no z at t = 0)
  euler         Karras et al. Alg. 2 without churn, latents scaled by sqrt(σ²+1):
                x' = x + (σ_{i+1} - σ_i) ε̂,  ε̂ = (x - x̂0)/σ_i
  euler_a       ancestral: x' = x + (σ_down - σ_i) ε̂ + σ_up z,
                σ_up = sqrt(σ_{i+1}² (σ_i² - σ_{i+1}²)/σ_i²), σ_down = sqrt(σ_{i+1}² - σ_up²)
  dpmpp_2m      DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), α_i = 1/sqrt(σ_i²+1), s_i = σ_i α_i,
                λ = log(α/s), h = λ_{i+1} - λ_i, r = h_{i-1}/h:
                x' = (s_{i+1}/s_i) x - α_{i+1}(e^{-h} - 1) (x̂0 + (x̂0 - x̂0_prev)/(2r))
                first order on the first step run and (final_sigmas_type zero, lower_order_final
                below 15 steps, euler_at_final) on the last
  dpmpp_2m_sde  its SDE variant: x' = (s_{i+1}/s_i) e^{-h} x + α_{i+1}(1 - e^{-2h}) (x̂0 + ...)
                + s_{i+1} sqrt(1 - e^{-2h}) z
  lcm           Luo et al. 2023: x̂ = c_out x̂0 + c_skip x; x' = sqrt(ᾱ_prev) x̂ + sqrt(1-ᾱ_prev) z,
                the last step x' = x̂ (no noise)
Schedules: "uniform" (the config's timestep_spacing), "trailing" (evenly spaced, ending at the
last training timestep: the zero-SNR paper's choice), "karras" (Karras et al. eq. 5, ρ = 7, for
the σ-based samplers: euler, euler_a, dpmpp_2m, dpmpp_2m_sde).

Image to image starts at row s (sdrt.engine.scheduler.start_index); the image latents are noised
to row s with the sampler's own forward process (`noise_coefficients`: diffusers' add_noise):
    VP samplers (ddim, ddpm, lcm, dpm++):  x_s = α_s x0 + s_s ε
    Euler samplers:                       x_s = x0 + σ_s ε
and the inpainting blend re-noises the known region to row i + 1 with the same coefficients.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from sdrt.contract import STEP_COLUMNS, STEP_TABLE_ROWS
from sdrt.engine import scheduler
from sdrt.errors import UserError

SAMPLERS = ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde", "lcm")
SCHEDULES = ("uniform", "trailing", "karras")
KARRAS_SAMPLERS = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde")
STOCHASTIC = ("ddpm", "euler_a", "dpmpp_2m_sde", "lcm")   # read a fresh z per step

# Names people use (the SD web UI's old and new forms, k-diffusion's, diffusers' docs) -> (sampler,
# schedule it names or None). Matched case-insensitively with "_", "-" and runs of spaces as one space.
_NAMES = {
    "ddim": ("ddim", None), "ddpm": ("ddpm", None), "lcm": ("lcm", None),
    "euler": ("euler", None), "k euler": ("euler", None), "euler karras": ("euler", "karras"),
    "euler a": ("euler_a", None), "k euler a": ("euler_a", None), "euler ancestral": ("euler_a", None),
    "k euler ancestral": ("euler_a", None), "euler a karras": ("euler_a", "karras"),
    "dpm++ 2m": ("dpmpp_2m", None), "k dpm++ 2m": ("dpmpp_2m", None),
    "dpm++ 2m karras": ("dpmpp_2m", "karras"), "k dpm++ 2m karras": ("dpmpp_2m", "karras"),
    "dpm++ 2m sde": ("dpmpp_2m_sde", None), "k dpm++ 2m sde": ("dpmpp_2m_sde", None),
    "dpm++ 2m sde karras": ("dpmpp_2m_sde", "karras"), "k dpm++ 2m sde karras": ("dpmpp_2m_sde", "karras"),
}
SAMPLER_NAMES = ("DDIM", "DDPM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE",
                 "DPM++ 2M SDE Karras", "LCM")   # the names help and errors list


@dataclass(frozen=True)
class Sampler:
    """A sampler and its schedule (None: the folder's config decides: uniform, or karras where the
    config sets use_karras_sigmas)."""
    kind: str = "ddim"
    schedule: str | None = None

    @staticmethod
    def parse(name, schedule=None) -> "Sampler":
        """From a user's name ("DPM++ 2M Karras", "euler_a", "k_dpmpp_2m", ...) and --schedule."""
        if name is None:
            name = "ddim"
        if not isinstance(name, str) or _key(name) not in _NAMES:
            raise UserError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLER_NAMES)} "
                            f"(case-insensitive; schedules: {', '.join(SCHEDULES)})")
        kind, named = _NAMES[_key(name)]
        if schedule is not None:
            if not isinstance(schedule, str) or schedule.strip().lower() not in SCHEDULES:
                raise UserError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
            schedule = schedule.strip().lower()
            if named is not None and schedule != named:
                raise UserError(f"schedule {schedule!r} contradicts sampler {name!r} (it names the {named} "
                                f"schedule): give one of them")
        schedule = schedule or named
        if schedule == "karras" and kind not in KARRAS_SAMPLERS:
            raise UserError(f"schedule 'karras' needs a sigma-based sampler ({', '.join(KARRAS_SAMPLERS)}); "
                            f"{kind} takes uniform or trailing")
        return Sampler(kind, schedule)

    @property
    def label(self) -> str:
        return self.kind + (f"/{self.schedule}" if self.schedule else "")


def _key(name: str) -> str:
    k = re.sub(r"[\s_\-]+", " ", name.strip().lower()).replace("dpmpp", "dpm++")
    return k


# ---- config: the folder's scheduler config with each class's own defaults (from_config) ----------

# Defaults of diffusers' classes where they differ from DDIM's (sdrt.engine.scheduler.DDIMConfig).
_CLASS_DEFAULTS = {
    "ddim": {},
    "ddpm": dict(clip_sample=True, variance_type="fixed_small"),
    "euler": dict(timestep_spacing="linspace", steps_offset=0, use_karras_sigmas=False,
                  final_sigmas_type="zero", interpolation_type="linear", timestep_type="discrete"),
    "euler_a": dict(timestep_spacing="linspace", steps_offset=0),
    "dpmpp_2m": dict(timestep_spacing="linspace", steps_offset=0, use_karras_sigmas=False,
                     final_sigmas_type="zero", solver_type="midpoint", lower_order_final=True,
                     euler_at_final=False, lambda_min_clipped=-float("inf")),
    "lcm": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                set_alpha_to_one=True, original_inference_steps=50, timestep_scaling=10.0),
}
_CLASS_DEFAULTS["dpmpp_2m_sde"] = _CLASS_DEFAULTS["dpmpp_2m"]
_DDIM_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                      trained_betas=None, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True,
                      steps_offset=0, prediction_type="epsilon", timestep_spacing="leading",
                      rescale_betas_zero_snr=False, thresholding=False)
_ALLOWED = {"variance_type": ("fixed_small", "fixed_small_log", "fixed_large"),
            "final_sigmas_type": ("zero", "sigma_min"), "solver_type": ("midpoint", "heun"),
            "interpolation_type": ("linear",), "timestep_type": ("discrete",)}


@dataclass(frozen=True)
class SamplerConfig:
    """The keys one sampler reads, resolved like `SchedulerClass.from_config(folder_config)`."""
    sampler: Sampler
    ddim: scheduler.DDIMConfig            # betas, prediction type, spacing, offset, zero-SNR, clip
    extra: tuple                          # the class's own keys, ((name, value), ...)

    def __getattr__(self, name):
        for k, v in object.__getattribute__(self, "extra"):
            if k == name:
                return v
        return getattr(object.__getattribute__(self, "ddim"), name)


def sampler_config(raw: dict, sampler: Sampler) -> SamplerConfig:
    """`raw`: the folder's scheduler_config.json as a dict (of any diffusers scheduler class)."""
    defaults = {**_DDIM_DEFAULTS, **_CLASS_DEFAULTS[sampler.kind]}
    cfg = {k: raw[k] if raw.get(k) is not None else v for k, v in defaults.items()}
    ddim = scheduler.DDIMConfig.from_json({k: cfg[k] for k in _DDIM_DEFAULTS})
    extra = {k: cfg[k] for k in defaults if k not in _DDIM_DEFAULTS}
    for k, allowed in _ALLOWED.items():
        if k in extra and extra[k] not in allowed:
            raise UserError(f"scheduler config: {k}={extra[k]!r} is not supported by the {sampler.kind} "
                            f"sampler (use one of {', '.join(allowed)})")
    if sampler.kind in ("dpmpp_2m", "dpmpp_2m_sde") and raw.get("use_karras_sigmas") and sampler.schedule is None:
        sampler = Sampler(sampler.kind, "karras")
    if sampler.kind == "euler" and raw.get("use_karras_sigmas") and sampler.schedule is None:
        sampler = Sampler(sampler.kind, "karras")
    if sampler.schedule == "trailing":
        ddim = scheduler.DDIMConfig(**{**ddim.__dict__, "timestep_spacing": "trailing"})
    return SamplerConfig(sampler, ddim, tuple(extra.items()))


# ---- the table ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    """A step table and what the host does around it."""
    rows: np.ndarray          # [STEP_TABLE_ROWS, len(STEP_COLUMNS)] float32, rows past `steps` zero
    steps: int
    start: int                # first row run (image to image)
    init_sigma: float         # x_T = init_sigma ε (text to image)
    add_noise: tuple          # (p, q): x_start = p x0 + q ε (image to image)
    stochastic: bool          # some row run reads z

    def column(self, name: str) -> np.ndarray:
        return self.rows[:self.steps, STEP_COLUMNS.index(name)]


def step_table(raw: dict, sampler: Sampler, steps: int, guidance: float, start: int = 0) -> Table:
    """The table of `sampler` for `steps` steps, the first one run being `start`."""
    cfg = sampler_config(raw, sampler)
    kind = cfg.sampler.kind
    if not _is_number(guidance) or not np.isfinite(guidance):
        raise UserError(f"guidance must be a finite number, got {guidance!r}")
    scheduler.timesteps(cfg.ddim, steps)                    # checks steps
    if steps > STEP_TABLE_ROWS:
        raise UserError(f"steps {steps} exceeds the engine's maximum of {STEP_TABLE_ROWS}")
    if kind == "ddim":
        rows = scheduler.step_table(cfg.ddim, steps, guidance)
        a = scheduler.alphas_cumprod(cfg.ddim)[scheduler.timesteps(cfg.ddim, steps)[start]]
        return Table(rows, steps, start, 1.0, (np.sqrt(a), np.sqrt(1 - a)), False)
    build = {"ddpm": _ddpm, "euler": _euler, "euler_a": _euler, "dpmpp_2m": _dpm, "dpmpp_2m_sde": _dpm,
             "lcm": _lcm}[kind]
    cols, noise_pq, init_sigma = build(cfg, steps, start)
    cols["guidance"] = guidance
    cols.setdefault("model_in_scale", 1.0)
    cols.setdefault("clip", scheduler.NO_CLIP)
    # inpainting: the known region re-noised to the next row, the clean image after the last
    p, q = noise_pq
    n = len(cols["timestep"])
    cols["sqrt_alpha_next"] = np.append(p[1:n], 1.0)
    cols["sqrt_one_minus_alpha_next"] = np.append(q[1:n], 0.0)
    rows = np.stack([np.broadcast_to(np.asarray(cols.get(c, 0.0), np.float64), (n,)) for c in STEP_COLUMNS], 1)
    bad = ~np.isfinite(rows[start:]).all(1)
    if bad.any():
        i = int(np.argmax(bad)) + start
        raise UserError(f"sampler {kind} cannot step from timestep {cols['timestep'][i]:g} with this scheduler "
                        f"config (prediction_type={cfg.prediction_type!r}, zero-SNR): use prediction_type "
                        f"v_prediction or another sampler")
    table = np.zeros((STEP_TABLE_ROWS, len(STEP_COLUMNS)), np.float32)
    table[:n] = rows
    stochastic = bool((table[start:n, STEP_COLUMNS.index("c_noise")] != 0).any())
    return Table(table, n, start, float(init_sigma), (float(p[start]), float(q[start])), stochastic)


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _alphas(cfg: SamplerConfig, sigma_based: bool) -> np.ndarray:
    """ᾱ as float64 of diffusers' float32; the σ-based classes set ᾱ_T = 2^-24 under zero-SNR so
    that σ_T stays finite."""
    a = scheduler.alphas_cumprod(cfg.ddim)
    if sigma_based and cfg.rescale_betas_zero_snr:
        a = a.copy()
        a[-1] = 2.0 ** -24
    return a


def _train_sigmas(a: np.ndarray) -> np.ndarray:
    """σ_t = sqrt((1 - ᾱ_t)/ᾱ_t), float32 as diffusers computes it from its float32 ᾱ."""
    a32 = a.astype(np.float32)
    return np.sqrt((np.float32(1) - a32) / a32).astype(np.float32)


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each σ: interpolation in log σ (Karras schedules)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _karras(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _float_timesteps(cfg: SamplerConfig, steps: int) -> np.ndarray:
    """Euler's timesteps (float32, not rounded for linspace), as EulerDiscreteScheduler.set_timesteps."""
    n = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    if cfg.timestep_spacing == "leading":
        return (np.arange(steps) * (n // steps)).round()[::-1].astype(np.float32) + np.float32(cfg.steps_offset)
    return (np.arange(n, 0, -n / steps).round().astype(np.float32) - np.float32(1))[:steps]


def _sigma_prediction(prediction_type: str, sigma: np.ndarray) -> dict:
    """x̂0 and ε̂ = (x - x̂0)/σ for latents x in σ-space (Euler's x = x_t sqrt(σ²+1), model input
    x/sqrt(σ²+1))."""
    s = sigma
    if prediction_type == "epsilon":
        c_x, c_m = np.ones_like(s), -s
    elif prediction_type == "v_prediction":
        c_x, c_m = 1 / (s ** 2 + 1), -s / np.sqrt(s ** 2 + 1)
    else:
        c_x, c_m = np.zeros_like(s), np.ones_like(s)
    return dict(c_x0_x=c_x, c_x0_m=c_m, c_eps_x=(1 - c_x) / s, c_eps_m=-c_m / s)


def _euler(cfg: SamplerConfig, steps: int, start: int):
    a = _alphas(cfg, True)
    train = _train_sigmas(a)
    ts = _float_timesteps(cfg, steps)
    sig = np.interp(ts, np.arange(len(train)), train)
    if cfg.sampler.schedule == "karras":
        sig = _karras(float(sig[0]), float(sig[-1]), steps)
        ts = _sigma_to_t(sig, np.log(train))
    final = 0.0 if getattr(cfg, "final_sigmas_type", "zero") == "zero" else float(train[0])
    sig = np.append(sig, final).astype(np.float32).astype(np.float64)
    s, s_next = sig[:-1], sig[1:]
    cols = dict(timestep=ts.astype(np.float32).astype(np.float64), model_in_scale=1 / np.sqrt(s ** 2 + 1),
                **_sigma_prediction(cfg.prediction_type, s), sqrt_alpha_prev=0.0, c_x=1.0)
    if cfg.sampler.kind == "euler":
        cols["sqrt_one_minus_alpha_prev"] = s_next - s                         # dt
    else:
        up = np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
        down = np.sqrt(s_next ** 2 - up ** 2)
        cols["sqrt_one_minus_alpha_prev"], cols["c_noise"] = down - s, up
    spacing_max = cfg.timestep_spacing in ("linspace", "trailing")
    init = np.float32(sig.max()) if spacing_max else np.sqrt(np.float32(sig.max()) ** 2 + 1)
    return cols, (np.ones_like(sig), sig), float(np.float32(init))


def _dpm_timesteps_sigmas(cfg: SamplerConfig, steps: int):
    n = cfg.num_train_timesteps
    a = _alphas(cfg, True)
    train = _train_sigmas(a)
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(steps + 1) * (n // (steps + 1))).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
    else:
        ts = np.arange(n, 0, -n / steps).round().astype(np.int64)[:steps] - 1
    if cfg.sampler.schedule == "karras":
        sig = _karras(float(train[-1]), float(train[0]), steps)
        ts = _sigma_to_t(sig, np.log(train))
        if cfg.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
    else:
        sig = np.interp(ts, np.arange(len(train)), train)
    final = 0.0 if cfg.final_sigmas_type == "zero" else float(train[0])
    return ts.astype(np.float64), np.append(sig, final).astype(np.float32).astype(np.float64)


def _dpm(cfg: SamplerConfig, steps: int, start: int):
    """DPM-Solver++(2M) and its SDE variant, data prediction, midpoint or heun second order."""
    ts, sig = _dpm_timesteps_sigmas(cfg, steps)
    alpha = 1 / np.sqrt(sig ** 2 + 1)                  # α_i
    s = sig * alpha                                    # σ_i of the VP process (diffusers' sigma_t)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(s)                # λ_i; +inf at σ = 0
    h = lam[1:] - lam[:-1]
    sa, ss = alpha[:-1], s[:-1]
    if cfg.prediction_type == "epsilon":
        c_x0_x, c_x0_m = 1 / sa, -ss / sa
    elif cfg.prediction_type == "v_prediction":
        c_x0_x, c_x0_m = sa, -ss
    else:
        c_x0_x, c_x0_m = np.zeros_like(sa), np.ones_like(sa)
    a_next, s_next = alpha[1:], s[1:]
    sde = cfg.sampler.kind == "dpmpp_2m_sde"
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(-h)
        if sde:
            c_x, k0, c_noise = s_next / ss * e, a_next * (1 - np.exp(-2 * h)), s_next * np.sqrt(1 - np.exp(-2 * h))
        else:
            c_x, k0, c_noise = s_next / ss, -a_next * (e - 1), np.zeros_like(h)
    # the coefficient of D1 = (x̂0 - x̂0_prev)/r, r = h_{i-1}/h_i
    h_prev = np.append(np.nan, h[:-1])
    r = h_prev / h
    if cfg.solver_type == "midpoint":
        k1 = 0.5 * k0
    elif sde:
        k1 = a_next * ((1 - np.exp(-2 * h)) / (-2 * h) + 1)
    else:
        k1 = a_next * ((e - 1) / h + 1)
    first = np.zeros(steps, bool)
    first[start] = True
    last = steps - 1
    if cfg.euler_at_final or (cfg.lower_order_final and steps < 15) or cfg.final_sigmas_type == "zero":
        first[last] = True
    first[:start] = True
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.where(first, k0, k0 + k1 / r)
        c = np.where(first, 0.0, -k1 / r)
    # h = inf at a final σ = 0: e^{-h} = 0, x' = x̂0 exactly
    c_x = np.where(np.isinf(h), 0.0, c_x)
    cols = dict(timestep=ts, c_x0_x=c_x0_x, c_x0_m=c_x0_m, sqrt_alpha_prev=b, c_x=c_x, c_x0_prev=c,
                c_noise=np.where(np.isinf(h), 0.0, c_noise))
    return cols, (alpha, s), 1.0


def _ddpm(cfg: SamplerConfig, steps: int, start: int):
    a = _alphas(cfg, False)
    ts = scheduler.timesteps(cfg.ddim, steps)
    a_t = a[ts]
    a_prev = np.append(a[ts[1:]], 1.0)                 # the last step lands on ᾱ = 1
    alpha_t = a_t / a_prev                             # α_t of the skipped-step chain
    beta_t = 1 - alpha_t
    var = np.maximum((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
    std = np.sqrt(beta_t) if cfg.variance_type == "fixed_large" else np.sqrt(var)
    cols = dict(timestep=ts.astype(np.float64), **scheduler._coefficients(cfg.prediction_type, a_t),
                clip=cfg.clip_sample_range if cfg.clip_sample else scheduler.NO_CLIP,
                sqrt_alpha_prev=np.sqrt(a_prev) * beta_t / (1 - a_t),
                c_x=np.sqrt(alpha_t) * (1 - a_prev) / (1 - a_t),
                c_noise=np.where(ts > 0, std, 0.0))
    cols["c_eps_x"] = cols["c_eps_m"] = 0.0
    return cols, (np.sqrt(a_t), np.sqrt(1 - a_t)), 1.0


def lcm_timesteps(cfg: SamplerConfig, steps: int) -> np.ndarray:
    """LCMScheduler.set_timesteps: `steps` of the distillation schedule's original_inference_steps."""
    original = cfg.original_inference_steps
    if steps > original:
        raise UserError(f"steps {steps}: the LCM sampler takes at most the {original} steps of its "
                        f"distillation schedule (original_inference_steps): use fewer steps")
    k = cfg.num_train_timesteps // original
    origin = (np.arange(1, original + 1) * k - 1)[::-1]
    return origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)]


def _lcm(cfg: SamplerConfig, steps: int, start: int):
    a = _alphas(cfg, False)
    ts = lcm_timesteps(cfg, steps)
    a_t = a[ts]
    a_prev = np.append(a[ts[1:]], a[ts[-1]])
    st = ts.astype(np.float64) * cfg.timestep_scaling       # c_skip, c_out: σ_data = 0.5
    c_skip, c_out = 0.25 / (st ** 2 + 0.25), st / np.sqrt(st ** 2 + 0.25)
    last = np.arange(steps) == steps - 1
    keep = np.where(last, 1.0, np.sqrt(a_prev))
    cols = dict(timestep=ts.astype(np.float64), **scheduler._coefficients(cfg.prediction_type, a_t),
                clip=cfg.clip_sample_range if cfg.clip_sample else scheduler.NO_CLIP,
                sqrt_alpha_prev=keep * c_out, c_x=keep * c_skip,
                c_noise=np.where(last, 0.0, np.sqrt(1 - a_prev)))
    cols["c_eps_x"] = cols["c_eps_m"] = 0.0
    return cols, (np.sqrt(a_t), np.sqrt(1 - a_t)), 1.0


def apply_row(row: np.ndarray, x: np.ndarray, m: np.ndarray, x0_prev=None, z=None):
    """(x', x̂0) from x, the (guided) model output m, the previous x̂0 and the noise z, in float32 in
    the step graph's order: the reference for export/compose_step.py."""
    r = dict(zip(STEP_COLUMNS, np.asarray(row, np.float32)))
    x, m = np.asarray(x, np.float32), np.asarray(m, np.float32)
    x0 = np.clip(r["c_x0_x"] * x + r["c_x0_m"] * m, -r["clip"], r["clip"])
    eps = r["c_eps_x"] * x + r["c_eps_m"] * m
    out = r["sqrt_alpha_prev"] * x0 + r["sqrt_one_minus_alpha_prev"] * eps
    out = out + r["c_x"] * x
    if x0_prev is not None:
        out = out + r["c_x0_prev"] * np.asarray(x0_prev, np.float32)
    if z is not None:
        out = out + r["c_noise"] * np.asarray(z, np.float32)
    return out, x0


def step_noise(seed, steps: int, shape: tuple) -> np.ndarray:
    """The documented per-step noise [steps, B, C, h, w]: the generator that drew the initial
    latents (np.random.default_rng(seed), PCG64: standard_normal(shape) float32) goes on to draw
    standard_normal((steps, *shape)) float32; row i is the z of step i. With one seed per sample
    (a list), sample b's generator draws its ε [C, h, w] and then its z [steps, C, h, w], so each
    sample is the same as a batch of one with its seed."""
    if isinstance(seed, (list, tuple)):
        out = []
        for s in seed:
            rng = np.random.default_rng(s)
            rng.standard_normal(shape[1:], dtype=np.float32)
            out.append(rng.standard_normal((steps, *shape[1:]), dtype=np.float32))
        return np.stack(out, 1)
    rng = np.random.default_rng(seed)
    rng.standard_normal(shape, dtype=np.float32)
    return rng.standard_normal((steps, *shape), dtype=np.float32)


def check_steps(steps) -> None:
    if not isinstance(steps, Integral) or isinstance(steps, bool) or steps <= 0:
        raise UserError(f"steps must be a positive integer, got {steps!r}")


def check_noise(noise, steps: int, shape: tuple) -> np.ndarray:
    noise = np.asarray(noise)
    want = (steps, *shape)
    if noise.shape != want:
        raise UserError(f"noise has shape {list(noise.shape)}, expected {list(want)} "
                        f"([steps, batch, channels, latent height, latent width])")
    if not np.issubdtype(noise.dtype, np.floating) or not np.all(np.isfinite(noise)):
        raise UserError("noise must be finite floating-point values")
    return noise.astype(np.float32)


def check_cfg_cutoff(cutoff) -> float | None:
    if cutoff is None:
        return None
    if not _is_number(cutoff) or not 0 <= cutoff <= 1:
        raise UserError(f"cfg cutoff {cutoff!r} must be a fraction of the steps in [0, 1] "
                        f"(after it the step runs without the unconditional half)")
    return float(cutoff)


def guided_steps(steps: int, cutoff: float | None) -> int:
    """Steps run with guidance: all of them, or the first int(steps · cutoff) (diffusers' CFG
    cut-off callback turns guidance off at step index int(steps · cutoff))."""
    return steps if cutoff is None else int(steps * cutoff)
