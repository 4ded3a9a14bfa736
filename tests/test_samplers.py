"""Every sampler's step table (sdrt.engine.samplers) against diffusers' own scheduler `step()`,
plus names, schedules, noise and the cut-off's bad values.

The loops feed both sides the same model: m = 0.5 u + r_i (u the scaled model input, r_i fixed
random per step) and the same per-step noise, in float32; the bound is 1e-4 of the result's
scale (diffusers computes its coefficients in float32 torch, the table in float64)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_samplers import CASES, feed_noise, scheduler_for
from sdrt.contract import STEP_COLUMNS
from sdrt.engine import samplers
from sdrt.engine.samplers import Sampler, apply_row, step_table
from sdrt.errors import UserError

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon",
            timestep_spacing="leading", _class_name="PNDMScheduler")
V_ZERO_SNR = {**SD15, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
              "timestep_spacing": "trailing"}
V_PRED = {**SD15, "prediction_type": "v_prediction", "_class_name": "DDIMScheduler", "clip_sample": True}
SHAPE = (2, 4, 8, 8)


def loop(config: dict, kind: str, schedule, steps: int, start: int = 0, seed: int = 0):
    """(ours, diffusers') final latents, and the timesteps of both."""
    table = step_table(config, Sampler(kind, schedule), steps, 7.5, start=start)
    ref = scheduler_for(kind, schedule, config)
    ref.set_timesteps(steps)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(start)
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal(SHAPE, dtype=np.float32)
    r = rng.standard_normal((steps, *SHAPE), dtype=np.float32)
    z = rng.standard_normal((steps, *SHAPE), dtype=np.float32)
    x = (eps * np.float32(table.init_sigma)).astype(np.float32)
    x_ref = torch.from_numpy(eps) * ref.init_noise_sigma
    x0_prev = np.zeros(SHAPE, np.float32)
    with feed_noise(ref, z, start):
        for i in range(start, steps):
            row = table.rows[i]
            u = row[STEP_COLUMNS.index("model_in_scale")] * x
            x, x0_prev = apply_row(row, x, 0.5 * u + r[i], x0_prev, z[i])
            t = ref.timesteps[i]
            u_ref = ref.scale_model_input(x_ref, t)
            x_ref = ref.step(0.5 * u_ref + torch.from_numpy(r[i]), t, x_ref).prev_sample
    return x, x_ref.numpy(), table.column("timestep"), ref.timesteps.numpy().astype(np.float64)


@pytest.mark.parametrize("config", [SD15, V_PRED, V_ZERO_SNR], ids=["sd15", "v", "v-zero-snr"])
@pytest.mark.parametrize("kind,schedule", CASES)
@pytest.mark.parametrize("steps", [7, 20])
def test_table_matches_diffusers_step(config, kind, schedule, steps):
    if kind == "lcm" and config is V_ZERO_SNR:
        pytest.skip("LCM with zero-SNR betas: diffusers divides by sqrt(ᾱ_T) = 0")
    if config is V_ZERO_SNR and kind in ("ddim", "ddpm") and schedule is None:
        schedule = "trailing"
    ours, ref, ts, ts_ref = loop(config, kind, schedule, steps)
    np.testing.assert_allclose(ts, ts_ref, rtol=0, atol=1e-3)
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(ours - ref).max() / scale < 1e-4, (np.abs(ours - ref).max(), scale)


@pytest.mark.parametrize("kind", ["euler", "dpmpp_2m", "dpmpp_2m_sde", "ddpm", "lcm"])
def test_image_to_image_start_matches_diffusers(kind):
    """Starting part-way (strength < 1): DPM++'s first step run is first order, as diffusers'."""
    ours, ref, _, _ = loop(SD15, kind, None, 10, start=4)
    assert np.abs(ours - ref).max() / max(1.0, float(np.abs(ref).max())) < 1e-4


@pytest.mark.parametrize("kind,schedule", [(k, s) for k, s in CASES if k != "ddim"])
def test_add_noise_matches_diffusers(kind, schedule):
    table = step_table(SD15, Sampler(kind, schedule), 10, 7.5, start=3)
    ref = scheduler_for(kind, schedule, SD15)
    ref.set_timesteps(10)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(3)
    rng = np.random.default_rng(1)
    x0, eps = rng.standard_normal(SHAPE, dtype=np.float32), rng.standard_normal(SHAPE, dtype=np.float32)
    p, q = table.add_noise
    got = np.float32(p) * x0 + np.float32(q) * eps
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), ref.timesteps[3:4]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ddim_rows_are_the_ddim_table_with_zero_extra_terms():
    from sdrt.engine import scheduler
    ddim = step_table(SD15, Sampler("ddim"), 30, 7.5)
    old = scheduler.step_table(scheduler.DDIMConfig.from_json(SD15), 30, 7.5)
    np.testing.assert_array_equal(ddim.rows, old)
    for c, v in (("model_in_scale", 1), ("c_x", 0), ("c_x0_prev", 0), ("c_noise", 0)):
        assert (ddim.column(c) == v).all()
    assert not ddim.stochastic


def test_dpm_first_and_last_steps_are_first_order():
    t = step_table(SD15, Sampler("dpmpp_2m"), 20, 7.5)
    c = t.column("c_x0_prev")
    assert c[0] == 0 and c[-1] == 0 and (c[1:-1] != 0).all()
    assert t.column("c_x")[-1] == 0 and t.column("sqrt_alpha_prev")[-1] == 1   # σ = 0: x' = x̂0
    sm = step_table({**SD15, "final_sigmas_type": "sigma_min"}, Sampler("dpmpp_2m"), 20, 7.5)
    assert sm.column("c_x0_prev")[-1] != 0        # ≥ 15 steps, final σ_min: second order to the end


def test_lcm_last_step_has_no_noise_and_stochastic_flags():
    t = step_table(SD15, Sampler("lcm"), 4, 1.0)
    assert (t.column("c_noise")[:-1] > 0).all() and t.column("c_noise")[-1] == 0
    assert t.stochastic and step_table(SD15, Sampler("euler_a"), 4, 1.0).stochastic
    assert not step_table(SD15, Sampler("dpmpp_2m"), 4, 1.0).stochastic


@pytest.mark.parametrize("name,want", [
    ("DDIM", ("ddim", None)), ("euler a", ("euler_a", None)), ("Euler_A", ("euler_a", None)),
    ("k_euler_a", ("euler_a", None)), ("DPM++ 2M Karras", ("dpmpp_2m", "karras")),
    ("dpmpp_2m_sde_karras", ("dpmpp_2m_sde", "karras")), ("DPM++ 2M SDE", ("dpmpp_2m_sde", None)),
    ("  lcm ", ("lcm", None)), ("Euler", ("euler", None)), ("ddpm", ("ddpm", None))])
def test_sampler_names(name, want):
    s = Sampler.parse(name)
    assert (s.kind, s.schedule) == want


def test_schedule_option():
    assert Sampler.parse("DPM++ 2M", "Karras") == Sampler("dpmpp_2m", "karras")
    assert Sampler.parse("euler", "trailing") == Sampler("euler", "trailing")
    assert Sampler.parse("ddim", "uniform").schedule == "uniform"


@pytest.mark.parametrize("name,schedule,words", [
    ("heun", None, ["unknown sampler", "DPM++ 2M Karras", "Euler a", "LCM"]),
    ("ddim", "exponential", ["unknown schedule", "karras", "trailing"]),
    ("ddim", "karras", ["karras", "sigma-based"]),
    ("DPM++ 2M Karras", "uniform", ["contradicts"])])
def test_bad_sampler_names(name, schedule, words):
    with pytest.raises(UserError) as e:
        Sampler.parse(name, schedule)
    for w in words:
        assert w.lower() in str(e.value).lower()
    assert "\n" not in str(e.value)


def test_bad_values():
    with pytest.raises(UserError, match="at most the 50"):
        step_table(SD15, Sampler("lcm"), 60, 1.0)
    with pytest.raises(UserError, match="noise has shape"):
        samplers.check_noise(np.zeros((3, 1, 4, 8, 8)), 4, (1, 4, 8, 8))
    with pytest.raises(UserError, match="finite"):
        samplers.check_noise(np.full((4, 1, 4, 8, 8), np.nan), 4, (1, 4, 8, 8))
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(UserError, match="cfg cutoff"):
            samplers.check_cfg_cutoff(bad)
    with pytest.raises(UserError, match="variance_type"):
        step_table({**SD15, "variance_type": "learned_range"}, Sampler("ddpm"), 10, 1.0)


def test_step_noise_is_documented_generator():
    z = samplers.step_noise(5, 3, (1, 4, 2, 2))
    rng = np.random.default_rng(5)
    first = rng.standard_normal((1, 4, 2, 2), dtype=np.float32)
    np.testing.assert_array_equal(z, rng.standard_normal((3, 1, 4, 2, 2), dtype=np.float32))
    np.testing.assert_array_equal(first, np.random.default_rng(5).standard_normal((1, 4, 2, 2), dtype=np.float32))
