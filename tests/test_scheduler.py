"""The numpy DDIM (sdrt.engine.scheduler) against diffusers' DDIMScheduler, plus hard-coded goldens.

Loops run eta = 0 DDIM with random x_T and random model outputs in float32 (apply_step) and in
torch float64 (DDIMScheduler.step on its own ᾱ, upcast). Random outputs make the latents grow
(one epsilon step from t = 999 already reaches ~50), and float32 carries ~7 digits, so the bound
is 1e-5 of the result's scale: max |ours - diffusers| < 1e-5 * max(1, max |diffusers|).

Why upcast ᾱ: on float32 ᾱ, diffusers' `alpha_prod_t ** 0.5` is torch's float32 pow, which is
not correctly rounded and errs high on average; over 999 v-prediction steps that drifts the
result ~1e-5 (relative) from exact DDIM. The table's sqrt is correctly rounded.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from sdrt.contract import STEP_COLUMNS, STEP_TABLE_ROWS
from sdrt.engine import scheduler
from sdrt.engine.scheduler import DDIMConfig, apply_step, step_table, timesteps
from sdrt.errors import UserError

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon",
            timestep_spacing="leading")
# SD 1.5's own scheduler/scheduler_config.json (a PNDM config; DDIM takes the shared keys).
SD15_PNDM = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}
REL_TOL = 1e-5
col = {c: i for i, c in enumerate(STEP_COLUMNS)}


def loop_error(config: dict, steps: int, seed: int = 0) -> float:
    """Whole-loop max |apply_step - DDIMScheduler.step| relative to the result's scale; also checks
    the timesteps are diffusers' exactly."""
    ref = DDIMScheduler(**config)
    ref.set_timesteps(steps)
    ref.alphas_cumprod, ref.final_alpha_cumprod = ref.alphas_cumprod.double(), ref.final_alpha_cumprod.double()
    cfg = DDIMConfig.from_json(config)
    ts = timesteps(cfg, steps)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    table = step_table(cfg, steps, 7.5)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    x_ref = torch.from_numpy(x).double()
    for i, t in enumerate(ts):
        m = rng.standard_normal(x.shape, dtype=np.float32)
        x = apply_step(table[i], x, m)
        x_ref = ref.step(torch.from_numpy(m).double(), int(t), x_ref).prev_sample
    assert x.dtype == np.float32
    x_ref = x_ref.numpy()
    return float(np.abs(x - x_ref).max() / max(1.0, np.abs(x_ref).max()))


CASES = {
    "sd15-leading": {},
    "sd15-trailing": dict(timestep_spacing="trailing"),
    "sd15-linspace": dict(timestep_spacing="linspace"),
    "v_prediction": dict(prediction_type="v_prediction"),
    "sample": dict(prediction_type="sample"),
    "clip_sample": dict(clip_sample=True),
    "clip_sample-range-2.5-sample": dict(clip_sample=True, clip_sample_range=2.5, prediction_type="sample"),
    "set_alpha_to_one": dict(set_alpha_to_one=True),
    "zero-snr-v-trailing": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                timestep_spacing="trailing"),
    "zero-snr-v-leading": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}


@pytest.mark.parametrize("steps", [1, 2, 20, 50, 999])
@pytest.mark.parametrize("case", CASES)
def test_loop_matches_diffusers(case, steps):
    assert loop_error({**SD15, **CASES[case]}, steps) < REL_TOL


@pytest.mark.parametrize("extra", [dict(timestep_spacing="trailing"), dict(timestep_spacing="linspace"),
                                   dict(steps_offset=0),
                                   dict(timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                        prediction_type="v_prediction")])
def test_loop_1000_steps(extra):
    assert loop_error({**SD15, **extra}, 1000) < REL_TOL


def test_diffusers_defaults_and_trained_betas():
    assert loop_error({}, 50) < REL_TOL                    # DDIM's defaults: linear, clip_sample
    betas = np.linspace(1e-4, 0.03, 1000).tolist()
    assert loop_error({"trained_betas": betas, "clip_sample": False}, 30) < REL_TOL


def test_clip_sample_clips():
    """Random epsilon outputs push x̂0 far past ±1, so clipping must change the result."""
    cfg, clipped = DDIMConfig.from_json(SD15), DDIMConfig.from_json({**SD15, "clip_sample": True})
    x, m = np.ones((1, 4, 2, 2), np.float32), -np.ones((1, 4, 2, 2), np.float32)
    a = apply_step(step_table(cfg, 10, 1.0)[0], x, m)
    b = apply_step(step_table(clipped, 10, 1.0)[0], x, m)
    assert not np.allclose(a, b)
    assert step_table(clipped, 10, 1.0)[0, col["clip"]] == 1.0
    assert step_table(cfg, 10, 1.0)[0, col["clip"]] == np.float32(scheduler.NO_CLIP)


def test_trailing_drops_spurious_last_timestep():
    """diffusers' trailing spacing gives 62 timesteps (the last -1) for 61 steps; we keep 61."""
    ref = DDIMScheduler(**{**SD15, "timestep_spacing": "trailing"})
    ref.set_timesteps(61)
    assert ref.timesteps[-1] == -1 and len(ref.timesteps) == 62
    ts = timesteps(DDIMConfig.from_json({**SD15, "timestep_spacing": "trailing"}), 61)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy()[:61])


@pytest.mark.parametrize("extra", [{}, dict(beta_schedule="linear"), dict(beta_schedule="squaredcos_cap_v2"),
                                   dict(rescale_betas_zero_snr=True),
                                   dict(trained_betas=np.linspace(1e-4, 0.03, 1000).tolist())])
def test_alphas_cumprod_are_diffusers_float32(extra):
    """diffusers' float32 ᾱ to a few float32 ulps: torch's float32 linspace rounds some β the other
    way (how many depends on the CPU's vector width), and torch's float32 sqrt in the zero-SNR rescale
    is not always correctly rounded (see test_zero_snr_rescale_is_diffusers_float32)."""
    config = {**SD15, **extra}
    ref = DDIMScheduler(**config).alphas_cumprod.double().numpy()
    ours = scheduler.alphas_cumprod(DDIMConfig.from_json(config))
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6 if config.get("rescale_betas_zero_snr") else 0)


# Goldens from exact DDIM math (a plain float64 loop over SD 1.5's betas), not from diffusers; the
# float32 schedule sits within ~1e-6 of them.
A981, A961 = 0.0057755001394957, 0.0072817271409430


def test_sd15_golden_numbers():
    cfg = DDIMConfig.from_json(SD15)
    np.testing.assert_array_equal(timesteps(cfg, 50)[:5], [981, 961, 941, 921, 901])
    np.testing.assert_array_equal(timesteps(cfg, 50)[-1], 1)
    a = scheduler.alphas_cumprod(cfg)
    np.testing.assert_allclose(a[[981, 961, 941, 921, 901]],
                               [A981, A961, 0.0091173098019637, 0.0113379115687078, 0.0140048978939439], rtol=3e-6)
    np.testing.assert_allclose(a[[0, 1, 999]], [0.99915, 0.9982960278384514, 0.004660098513077234], rtol=3e-6)

    table = step_table(cfg, 50, 7.5)
    assert table.shape == (STEP_TABLE_ROWS, len(STEP_COLUMNS)) and table.dtype == np.float32
    row0 = dict(zip(STEP_COLUMNS, table[0]))
    expect = dict(timestep=981, c_x0_x=1 / A981 ** 0.5, c_x0_m=-((1 - A981) / A981) ** 0.5, c_eps_x=0, c_eps_m=1,
                  sqrt_alpha_prev=A961 ** 0.5, sqrt_one_minus_alpha_prev=(1 - A961) ** 0.5, clip=3.0e38,
                  guidance=7.5, sqrt_alpha_next=A961 ** 0.5, sqrt_one_minus_alpha_next=(1 - A961) ** 0.5,
                      model_in_scale=1, c_x=0, c_x0_prev=0, c_noise=0)
    for c in STEP_COLUMNS:
        np.testing.assert_allclose(row0[c], expect[c], rtol=2e-6, err_msg=c)
    np.testing.assert_allclose(row0["c_x0_x"], 13.1585, rtol=1e-5)
    # last step: t = 1, prev = 1 - 20 < 0 -> final_alpha_cumprod = ᾱ_0 (set_alpha_to_one false)
    np.testing.assert_allclose(table[49, col["sqrt_alpha_prev"]], 0.99915 ** 0.5, rtol=1e-7)
    np.testing.assert_allclose(table[49, col["sqrt_one_minus_alpha_prev"]], 0.00085 ** 0.5, rtol=5e-5)
    assert not table[50:].any()
    assert scheduler.INIT_NOISE_SIGMA == 1.0


def test_next_timestep_columns():
    """The inpainting blend re-noises to the next timestep of the schedule (not t - T/steps, which
    differs with linspace spacing); after the last step it blends in the clean image (ᾱ := 1)."""
    cfg = DDIMConfig.from_json({**SD15, "timestep_spacing": "linspace"})
    ts, a = timesteps(cfg, 10), scheduler.alphas_cumprod(cfg)
    table = step_table(cfg, 10, 7.5)
    np.testing.assert_allclose(table[:9, col["sqrt_alpha_next"]], np.sqrt(a[ts[1:]]), rtol=1e-6)
    np.testing.assert_allclose(table[:9, col["sqrt_one_minus_alpha_next"]], np.sqrt(1 - a[ts[1:]]), rtol=1e-6)
    assert table[9, col["sqrt_alpha_next"]] == 1.0 and table[9, col["sqrt_one_minus_alpha_next"]] == 0.0
    assert ts[1] != ts[0] - 1000 // 10   # 888 vs 899: the next timestep is not the "previous" one


@pytest.mark.parametrize("steps,strength", [(50, 0.75), (10, 1.0), (7, 0.5), (3, 0.34)])
def test_start_index_and_add_noise_match_diffusers(steps, strength):
    """get_timesteps' t_start and DDIMScheduler.add_noise at the first kept timestep."""
    from diffusers import StableDiffusionImg2ImgPipeline
    ref = DDIMScheduler(**SD15)
    ref.set_timesteps(steps)
    kept, n = StableDiffusionImg2ImgPipeline.get_timesteps(
        type("P", (), {"scheduler": ref})(), steps, strength, "cpu")
    start = scheduler.start_index(steps, strength)
    assert steps - start == n and kept[0] == timesteps(DDIMConfig.from_json(SD15), steps)[start]
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 4, 3, 5), dtype=np.float32), rng.standard_normal((2, 4, 3, 5), dtype=np.float32)
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), kept[:1].repeat(2)).numpy()
    got = scheduler.add_noise(DDIMConfig.from_json(SD15), steps, start, x0, eps)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strength", [0, -0.5, 1.01, float("nan"), "0.5"])
def test_strength_outside_range(strength):
    with pytest.raises(UserError, match="must be in"):
        scheduler.start_index(50, strength)
    with pytest.raises(UserError, match="leaves no step"):
        scheduler.start_index(4, 0.2)


def test_golden_spacings_10_steps():
    def ts(**kw):
        return timesteps(DDIMConfig.from_json({**SD15, **kw}), 10).tolist()
    assert ts() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert ts(timestep_spacing="trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert ts(timestep_spacing="linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]


def test_set_alpha_to_one_golden():
    table = step_table(DDIMConfig.from_json({**SD15, "set_alpha_to_one": True}), 50, 1.0)
    assert table[49, col["sqrt_alpha_prev"]] == 1.0 and table[49, col["sqrt_one_minus_alpha_prev"]] == 0.0


def test_apply_step_golden():
    """epsilon at ᾱ_t = 0.25 to ᾱ_prev = 0.64: x̂0 = (x - sqrt(.75) m)/.5, x_prev = .8 x̂0 + .6 m."""
    row = np.zeros(len(STEP_COLUMNS), np.float32)
    row[[col["c_x0_x"], col["c_x0_m"], col["c_eps_m"]]] = [2.0, -2 * 0.75 ** 0.5, 1.0]
    row[[col["sqrt_alpha_prev"], col["sqrt_one_minus_alpha_prev"], col["clip"]]] = [0.8, 0.6, 3e38]
    x, m = np.array([1.0, -2.0], np.float32), np.array([0.5, 0.25], np.float32)
    np.testing.assert_allclose(apply_step(row, x, m), 0.8 * (x - 0.75 ** 0.5 * m) / 0.5 + 0.6 * m, rtol=1e-6)
    row[col["clip"]] = 1.0
    np.testing.assert_allclose(apply_step(row, x, m), 0.8 * np.clip((x - 0.75 ** 0.5 * m) / 0.5, -1, 1) + 0.6 * m,
                               rtol=1e-6)


def test_from_other_scheduler_config_like_from_config(tmp_path):
    """SD 1.5's PNDM config and a config missing clip_sample: the same as DDIMScheduler.from_config."""
    for source in (SD15_PNDM, {k: v for k, v in SD15_PNDM.items() if k != "clip_sample"}):
        path = tmp_path / "scheduler_config.json"
        path.write_text(json.dumps(source))
        cfg = DDIMConfig.from_json(path)
        ref = DDIMScheduler.from_config(source).config
        for f in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "clip_sample",
                  "clip_sample_range", "set_alpha_to_one", "steps_offset", "prediction_type",
                  "timestep_spacing", "rescale_betas_zero_snr", "thresholding"):
            assert getattr(cfg, f) == ref[f], f
    assert DDIMConfig.from_json(SD15_PNDM) == DDIMConfig.from_json(SD15)
    assert loop_error({k: v for k, v in SD15_PNDM.items() if not k.startswith("_")
                       and k != "skip_prk_steps"}, 50) < REL_TOL


@pytest.mark.parametrize("extra,words", [
    (dict(thresholding=True), "thresholding"),
    (dict(beta_schedule="exp"), "beta_schedule"),
    (dict(timestep_spacing="karras"), "timestep_spacing"),
    (dict(prediction_type="flow"), "prediction_type"),
    (dict(num_train_timesteps="1000"), "num_train_timesteps"),
    (dict(num_train_timesteps=0), "num_train_timesteps"),
    (dict(clip_sample="yes"), "clip_sample"),
    (dict(beta_end="0.012"), "beta_end"),
    (dict(steps_offset=1.5), "steps_offset"),
    (dict(trained_betas=[0.1, 0.2]), "trained_betas"),
    (dict(trained_betas=["a"] * 1000), "trained_betas"),
])
def test_bad_config_names_the_key(extra, words):
    with pytest.raises(UserError, match=words):
        DDIMConfig.from_json({**SD15, **extra})


def test_bad_config_file(tmp_path):
    with pytest.raises(UserError, match="cannot read scheduler config"):
        DDIMConfig.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read scheduler config"):
        DDIMConfig.from_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        DDIMConfig.from_json(tmp_path / "list.json")


@pytest.mark.parametrize("steps,words", [(0, "positive"), (-3, "positive"), (2.5, "positive"),
                                         (True, "positive"), (1001, "exceeds"),
                                         (1000, "steps_offset")])   # leading + offset 1: t = 1000
def test_bad_steps(steps, words):
    cfg = DDIMConfig.from_json(SD15)
    with pytest.raises(UserError, match=words):
        timesteps(cfg, steps)
    with pytest.raises(UserError, match=words):
        step_table(cfg, steps, 7.5)


def test_bad_guidance():
    with pytest.raises(UserError, match="guidance"):
        step_table(DDIMConfig.from_json(SD15), 10, float("nan"))


def test_epsilon_at_zero_snr_is_refused():
    """Zero terminal SNR makes ᾱ_999 = 0, where epsilon cannot give x̂0 (diffusers returns inf/nan)."""
    cfg = DDIMConfig.from_json({**SD15, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"})
    with pytest.raises(UserError, match="prediction_type"):
        step_table(cfg, 20, 7.5)
    assert np.isfinite(step_table(DDIMConfig.from_json({**SD15, "rescale_betas_zero_snr": True}), 20, 7.5)).all()


@pytest.mark.parametrize("schedule", ["squaredcos_cap_v2", "scaled_linear", "linear"])
def test_zero_snr_rescale_is_diffusers_float32(schedule):
    """The rescaled β are diffusers' float32 operations, bit for bit. torch's float32 sqrt on some
    CPU builds is not correctly rounded (1 ulp off for ~20% of inputs), so the reference runs
    diffusers' own function with an IEEE sqrt; the rest of its float32 arithmetic is as is."""
    from unittest import mock

    import torch
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
    betas = scheduler._betas(DDIMConfig.from_json({**SD15, "beta_schedule": schedule}))
    ieee_sqrt = lambda t: torch.sqrt(t.double()).to(t.dtype)
    with mock.patch.object(torch.Tensor, "sqrt", ieee_sqrt):
        ref = rescale_zero_terminal_snr(torch.from_numpy(betas)).numpy()
    ours = scheduler._rescale_zero_terminal_snr(betas)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)
