"""Noise schedules and respacing, checked against ADM's definitions and documented examples."""

import math

import numpy as np
import pytest
import torch

from fastguide.schedule import StepCoefficients, Schedule, cosine_betas, linear_betas, named_betas, space_timesteps


def test_linear_betas_match_ddpm_range_and_scale_with_T():
    b = linear_betas(1000)
    assert b.dtype == np.float64 and len(b) == 1000
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    # ADM scales the range so that any T matches T=1000's noise level
    b4000 = linear_betas(4000)
    assert b4000[0] == pytest.approx(0.25e-4) and b4000[-1] == pytest.approx(0.005)


def test_cosine_betas_follow_alpha_bar():
    T = 1000
    b = cosine_betas(T)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = np.cumprod(1 - b)
    for t in (0, 10, 500, 990):
        assert alpha_bar[t] == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)
    assert b.max() <= 0.999 and b[-1] == 0.999


def test_adm_docstring_example_sections():
    # ADM: 300 steps with counts [10, 15, 20] -> first 100 strided to 10, then 15, then 20
    steps = space_timesteps(300, [10, 15, 20])
    assert len(steps) == 45
    assert sum(s < 100 for s in steps) == 10
    assert sum(100 <= s < 200 for s in steps) == 15
    assert sum(s >= 200 for s in steps) == 20
    assert steps[:10] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]  # stride 99/9 = 11
    assert space_timesteps(300, "10,15,20") == steps


def test_uneven_sections_give_extra_steps_to_first_sections():
    # 1000 = 334 + 333 + 333
    steps = space_timesteps(1000, "2,2,2")
    assert steps == [0, 333, 334, 666, 667, 999]


def test_half_to_even_rounding_as_python_round():
    # 10 steps over a section of 1000: stride 111 exactly; 4 steps over 10: stride 3
    assert space_timesteps(10, "4") == [0, 3, 6, 9]
    # stride 2.5: 0, 2.5 -> 2 (half to even), 5, 7.5 -> 8, 10
    assert space_timesteps(11, "5") == [0, 2, 5, 8, 10]


def test_count_respacing_keeps_both_ends():
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999


def test_ddim_respacing_uses_fixed_integer_stride():
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))


def test_empty_respacing_keeps_every_step():
    assert space_timesteps(50, "") == list(range(50))
    s = Schedule.create("linear", 50, "")
    # like ADM (which respaces to [T] when the flag is empty), betas are re-derived from ᾱ: equal to rounding
    np.testing.assert_allclose(s.betas, linear_betas(50), rtol=1e-12)
    assert s.timestep_map == tuple(range(50))


@pytest.mark.parametrize(
    "respacing, count",
    [("0", "0"), ("ddim0", "0"), ("1001", "1001"), ("ddim600", "600"), ("10,0", "0"), ("500,500,500", "500")],
)
def test_impossible_respacing_names_the_requested_count(respacing, count):
    with pytest.raises(ValueError, match=rf"\b{count} steps"):
        space_timesteps(1000, respacing)


@pytest.mark.parametrize("respacing", ["fast", "ddimX", "10;20", "ddim"])
def test_unknown_respacing_is_named(respacing):
    with pytest.raises(ValueError, match=repr(respacing).replace("(", r"\(")):
        space_timesteps(1000, respacing)


def test_unknown_noise_schedule_is_named():
    with pytest.raises(ValueError, match="'sigmoid'"):
        named_betas("sigmoid", 1000)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("respacing", ["250", "ddim25", "10,15,20", "7"])
def test_respaced_betas_reproduce_the_kept_alpha_bars(schedule, respacing):
    base_alpha_bar = np.cumprod(1 - named_betas(schedule, 1000))
    s = Schedule.create(schedule, 1000, respacing)
    np.testing.assert_allclose(np.cumprod(1 - s.betas), base_alpha_bar[list(s.timestep_map)], rtol=1e-8)
    assert list(s.timestep_map) == space_timesteps(1000, respacing)
    assert s.num_original_timesteps == 1000


def test_networks_see_original_timesteps_optionally_rescaled():
    s = Schedule.create("linear", 4000, "ddim4")
    idx = torch.tensor([3, 0, 1])
    assert s.original_timesteps(idx).tolist() == [3000, 0, 1000]
    assert s.model_timesteps(idx).tolist() == [3000, 0, 1000]
    r = Schedule.create("linear", 4000, "ddim4", rescale_timesteps=True)
    assert r.model_timesteps(idx).tolist() == [750.0, 0.0, 250.0]


def test_coefficients_are_float64_tables_cast_once():
    s = Schedule.create("linear", 1000, "10")
    coefs = s.coefficients(torch.tensor([9, 0]))
    assert coefs.shape == (2, len(StepCoefficients._fields)) and coefs.dtype == torch.float32
    c = StepCoefficients.of(coefs)
    ac = np.cumprod(1 - s.betas)
    assert c.alpha_bar.shape == (2, 1, 1, 1) and c.alpha_bar.dtype == torch.float32
    assert c.alpha_bar.flatten().tolist() == [np.float32(ac[9]), np.float32(ac[0])]
    assert c.alpha_bar_prev.flatten()[1].item() == 1.0
    # posterior variance at the first step is zero; its log uses the second value (ADM)
    assert c.posterior_variance.flatten()[1].item() == 0.0
    post1 = s.betas[1] * (1 - ac[0]) / (1 - ac[1])
    assert c.posterior_log_variance_clipped.flatten()[1].item() == pytest.approx(math.log(post1), rel=1e-6)


def test_a_blank_respacing_is_refused_while_empty_keeps_every_step():
    from fastguide.schedule import space_timesteps

    assert space_timesteps(10, "") == list(range(10))
    with pytest.raises(ValueError, match=r"respacing ' ' is blank: give '' to keep every step"):
        space_timesteps(10, " ")
