"""Diffusion training losses (fastguide.losses), checked against float64 recomputations from the definitions."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from fastguide.schedule import Schedule
from fastguide.losses import (
    approx_standard_normal_cdf,
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    normal_kl,
    q_posterior_mean_variance,
    q_sample,
    sample_timesteps,
    vlb_term,
)

B, C, H, W = 5, 3, 4, 4
T_MIXED = [0, 1, 10, 500, 999]  # t = 0 (decoder NLL) and t > 0 (KL) in one batch


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _images(seed=0, shape=(B, C, H, W)):
    """Images on the 256-level grid of [-1, 1], including both edge values."""
    levels = torch.randint(0, 256, shape, generator=_gen(seed))
    levels.view(-1)[:2] = torch.tensor([0, 255])
    return levels.float() * (2 / 255) - 1


def _ref_tables(schedule):
    """ADM's float64 quantities, re-derived from the betas alone."""
    b = np.asarray(schedule.betas, dtype=np.float64)
    ab = np.cumprod(1 - b)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = b * (1 - ab_prev) / (1 - ab)
    return {
        "b": b,
        "ab": ab,
        "coef1": b * np.sqrt(ab_prev) / (1 - ab),
        "coef2": (1 - ab_prev) * np.sqrt(1 - b) / (1 - ab),
        "log_post_var": np.log(np.append(post_var[1], post_var[1:])),
    }


def _at(table, t):
    return torch.from_numpy(table)[t].view(-1, 1, 1, 1)


def _ref_model_gaussian(schedule, eps, v, x_t, t):
    """p(x_{t-1}|x_t) in float64: mean from ε via x̂_0, learned-range log variance (Improved DDPM Eq. 15)."""
    r = _ref_tables(schedule)
    x_t, eps, v = x_t.double(), eps.double(), v.double()
    ab = _at(r["ab"], t)
    xstart = x_t / ab.sqrt() - (1 / ab - 1).sqrt() * eps
    mean = _at(r["coef1"], t) * xstart + _at(r["coef2"], t) * x_t
    frac = (v + 1) / 2
    log_var = frac * _at(np.log(r["b"]), t) + (1 - frac) * _at(r["log_post_var"], t)
    return mean, log_var


# q_sample and the posterior


def test_q_sample_matches_closed_form_in_float64():
    schedule = Schedule.create("cosine", 1000, "")
    x0 = _images(1).double()
    noise = torch.randn(B, C, H, W, generator=_gen(2), dtype=torch.float64)
    t = torch.tensor([0, 3, 250, 700, 999])
    ab = _at(np.cumprod(1 - schedule.betas), t)
    expected = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    torch.testing.assert_close(q_sample(x0, t, noise, schedule), expected, rtol=1e-6, atol=1e-6)
    # float32 inputs give float32 x_t, equal to the float64 value up to float32 rounding
    x_t32 = q_sample(x0.float(), t, noise.float(), schedule)
    assert x_t32.dtype == torch.float32
    torch.testing.assert_close(x_t32.double(), expected, rtol=1e-5, atol=1e-5)


def test_q_sample_at_t0_is_nearly_x0_and_at_T_nearly_noise():
    schedule = Schedule.create("linear", 1000, "")
    x0, noise = _images(3), torch.randn(B, C, H, W, generator=_gen(4))
    x_first = q_sample(x0, torch.zeros(B, dtype=torch.long), noise, schedule)
    torch.testing.assert_close(x_first, x0, rtol=0, atol=0.01 * noise.abs().max().item() + 1e-4)
    x_last = q_sample(x0, torch.full((B,), 999), noise, schedule)
    torch.testing.assert_close(x_last, noise, rtol=0, atol=0.01)


def test_q_posterior_mean_variance_matches_ddpm_eq7():
    schedule = Schedule.create("linear", 100, "")
    r = _ref_tables(schedule)
    x0, x_t = _images(5), torch.randn(B, C, H, W, generator=_gen(6))
    t = torch.tensor([0, 1, 2, 50, 99])
    mean, log_var = q_posterior_mean_variance(x0, x_t, t, schedule)
    expected = _at(r["coef1"], t) * x0.double() + _at(r["coef2"], t) * x_t.double()
    torch.testing.assert_close(mean.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_var.double(), _at(r["log_post_var"], t), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(log_var).all()  # β̃_0 = 0 is clipped to β̃_1


# KL and the discretised likelihood


def test_normal_kl_is_zero_for_identical_gaussians():
    m = torch.randn(7, generator=_gen(7), dtype=torch.float64)
    lv = torch.randn(7, generator=_gen(8), dtype=torch.float64)
    assert normal_kl(m, lv, m, lv).abs().max().item() < 1e-12


def test_normal_kl_matches_analytic_formula_and_is_nonnegative():
    g = _gen(9)
    m1, m2 = torch.randn(2, 1000, generator=g, dtype=torch.float64)
    lv1, lv2 = 2 * torch.randn(2, 1000, generator=g, dtype=torch.float64)
    kl = normal_kl(m1, lv1, m2, lv2)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(kl, expected, rtol=1e-10, atol=1e-10)
    by_hand = torch.log((0.5 * lv2).exp() / (0.5 * lv1).exp()) + (lv1.exp() + (m1 - m2) ** 2) / (2 * lv2.exp()) - 0.5
    torch.testing.assert_close(kl, by_hand, rtol=1e-10, atol=1e-10)
    assert (kl >= 0).all()
    # broadcasting: a (B,1,1,1) log variance against (B,C,H,W) means
    x = torch.randn(2, 3, 4, 4, generator=g)
    assert normal_kl(x, torch.zeros(2, 1, 1, 1), x + 1, torch.zeros(2, 1, 1, 1)).shape == (2, 3, 4, 4)


def test_approx_standard_normal_cdf_is_close_to_the_exact_cdf():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max().item() < 5e-4
    assert approx_standard_normal_cdf(torch.tensor(0.0)).item() == 0.5


@pytest.mark.parametrize("mean,scale", [(0.3, 0.1), (-0.95, 0.02), (1.0, 0.5), (0.0, 3.0)])
def test_discretized_likelihood_sums_to_one_over_the_256_bins(mean, scale):
    centres = torch.arange(256, dtype=torch.float64) * (2 / 255) - 1
    means = torch.full_like(centres, mean)
    log_scales = torch.full_like(centres, math.log(scale))
    total = discretized_gaussian_log_likelihood(centres, means, log_scales).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-6)


def test_discretized_likelihood_prefers_a_sharper_gaussian_on_the_pixel():
    x = torch.tensor([-1.0, -1 + 2 * 77 / 255, 2 * 200 / 255 - 1, 1.0])
    sharp = discretized_gaussian_log_likelihood(x, x, torch.full_like(x, math.log(0.01)))
    broad = discretized_gaussian_log_likelihood(x, x, torch.full_like(x, math.log(0.1)))
    assert (sharp > broad).all()
    assert (sharp <= 0).all() and torch.isfinite(sharp).all()
    # edge bins are open-ended: a Gaussian centred on ±1 puts at least half its mass there
    assert sharp[0].exp().item() >= 0.5 and sharp[-1].exp().item() >= 0.5
    # far from the mean the probability is clamped at 1e-12, not -inf
    far = discretized_gaussian_log_likelihood(torch.tensor([0.0]), torch.tensor([0.9]), torch.tensor([math.log(1e-3)]))
    assert far.item() == pytest.approx(math.log(1e-12))


# vlb_term


def _vlb_inputs(schedule, seed=10):
    g = _gen(seed)
    x0 = _images(seed)
    noise = torch.randn(B, C, H, W, generator=g)
    t = torch.tensor(T_MIXED[:B])
    x_t = q_sample(x0, t, noise, schedule)
    eps = noise + 0.3 * torch.randn(B, C, H, W, generator=g)
    v = torch.rand(B, C, H, W, generator=g) * 2 - 1
    return x0, x_t, t, eps, v


def test_vlb_term_at_t_positive_is_the_kl_in_bits_per_dim():
    schedule = Schedule.create("linear", 1000, "")
    x0, x_t, t, eps, v = _vlb_inputs(schedule)
    out = vlb_term(eps, v, x0, x_t, t, schedule)
    assert out.shape == (B,) and out.dtype == torch.float32
    r = _ref_tables(schedule)
    true_mean = _at(r["coef1"], t) * x0.double() + _at(r["coef2"], t) * x_t.double()
    true_std = (0.5 * _at(r["log_post_var"], t)).exp().expand_as(true_mean)
    model_mean, model_log_var = _ref_model_gaussian(schedule, eps, v, x_t, t)
    kl = kl_divergence(Normal(true_mean, true_std), Normal(model_mean, (0.5 * model_log_var).exp()))
    expected = kl.mean(dim=(1, 2, 3)) / math.log(2)
    pos = t > 0
    torch.testing.assert_close(out[pos].double(), expected[pos], rtol=2e-4, atol=1e-6)


def test_vlb_term_at_t0_is_the_decoder_nll_in_bits_per_dim():
    schedule = Schedule.create("linear", 1000, "")
    x0, x_t, t, eps, v = _vlb_inputs(schedule, seed=11)
    out = vlb_term(eps, v, x0, x_t, t, schedule)
    model_mean, model_log_var = _ref_model_gaussian(schedule, eps, v, x_t, t)
    nll = -discretized_gaussian_log_likelihood(x0.double(), model_mean, 0.5 * model_log_var)
    expected = nll.mean(dim=(1, 2, 3)) / math.log(2)
    assert t[0] == 0
    torch.testing.assert_close(out[0].double(), expected[0], rtol=2e-4, atol=1e-5)
    assert out[0] > 0


def test_vlb_term_with_the_true_posterior_is_zero_for_t_positive():
    # ε = the true noise and v giving log σ² = log β̃_t make p equal q: KL = 0 (up to float32)
    schedule = Schedule.create("linear", 1000, "")
    x0, noise = _images(12), torch.randn(B, C, H, W, generator=_gen(13))
    t = torch.tensor([1, 10, 100, 500, 900])
    x_t = q_sample(x0, t, noise, schedule)
    out = vlb_term(noise, -torch.ones_like(noise), x0, x_t, t, schedule)
    assert out.abs().max().item() < 1e-3


def test_vlb_term_gradient_reaches_v_but_not_eps():
    schedule = Schedule.create("linear", 1000, "")
    x0, x_t, t, eps, v = _vlb_inputs(schedule, seed=14)
    out = torch.cat([eps, v], dim=1).requires_grad_(True)
    e, vv = out.chunk(2, dim=1)
    vlb_term(e, vv, x0, x_t, t, schedule).sum().backward()
    assert (out.grad[:, :C] == 0).all()
    assert (out.grad[:, C:].abs().sum(dim=(1, 2, 3)) > 0).all()


# diffusion_loss


class _Oracle(torch.nn.Module):
    """Returns a fixed output and records what it was called with."""

    def __init__(self, output):
        super().__init__()
        self.output, self.calls = output, []

    def forward(self, x_t, t, **kwargs):
        self.calls.append((x_t, t, kwargs))
        return self.output


def _loss_inputs(seed=20, T=1000):
    schedule = Schedule.create("linear", T, "")
    g = _gen(seed)
    x0, noise = _images(seed), torch.randn(B, C, H, W, generator=g)
    t = sample_timesteps(B, T, g, "cpu")
    t[0] = 0
    return schedule, x0, noise, t


def test_true_noise_gives_zero_mse():
    schedule, x0, noise, t = _loss_inputs()
    terms = diffusion_loss(_Oracle(noise.clone()), x0, t, noise, schedule)
    assert terms.mse.shape == (B,) and (terms.mse == 0).all()
    v = torch.zeros_like(noise)
    terms = diffusion_loss(_Oracle(torch.cat([noise, v], 1)), x0, t, noise, schedule, learn_sigma=True)
    assert (terms.mse == 0).all() and (terms.vb > 0).any()


@pytest.mark.parametrize("T", [1000, 50])
def test_hybrid_loss_is_mse_plus_lambda_T_vb(T):
    schedule, x0, noise, t = _loss_inputs(21, T)
    out = torch.randn(B, 2 * C, H, W, generator=_gen(22)).clamp(-1, 1)
    terms = diffusion_loss(_Oracle(out), x0, t, noise, schedule, learn_sigma=True)
    assert terms.loss.shape == terms.mse.shape == terms.vb.shape == (B,)
    torch.testing.assert_close(terms.loss, terms.mse + 0.001 * T * terms.vb)
    x_t = q_sample(x0, t, noise, schedule)
    torch.testing.assert_close(terms.vb, vlb_term(out[:, :C], out[:, C:], x0, x_t, t, schedule))
    torch.testing.assert_close(terms.mse, ((noise - out[:, :C]) ** 2).mean(dim=(1, 2, 3)))
    custom = diffusion_loss(_Oracle(out), x0, t, noise, schedule, learn_sigma=True, lambda_vlb=0.5)
    torch.testing.assert_close(custom.loss, terms.mse + 0.5 * T * terms.vb)


def test_c_channel_model_has_no_vb_and_loss_is_mse():
    schedule, x0, noise, t = _loss_inputs(23)
    terms = diffusion_loss(_Oracle(torch.zeros(B, C, H, W)), x0, t, noise, schedule)
    assert terms.vb is None
    assert torch.equal(terms.loss, terms.mse)
    torch.testing.assert_close(terms.mse, (noise**2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize(
    "channels,learn_sigma", [(C + 1, False), (2 * C, False), (C, True), (2 * C + 1, True)]
)
def test_wrong_output_channels_raise_with_the_shape(channels, learn_sigma):
    schedule, x0, noise, t = _loss_inputs(24)
    model = _Oracle(torch.zeros(B, channels, H, W))
    with pytest.raises(ValueError, match=re_shape((B, channels, H, W))):
        diffusion_loss(model, x0, t, noise, schedule, learn_sigma=learn_sigma)


def re_shape(shape):
    return "\\(" + ", ".join(str(s) for s in shape) + "\\)"


def test_model_sees_noised_input_original_timesteps_and_kwargs():
    schedule, x0, noise, t = _loss_inputs(25)
    y = torch.arange(B)
    model = _Oracle(torch.zeros(B, C, H, W))
    diffusion_loss(model, x0, t, noise, schedule, model_kwargs={"y": y})
    ((x_t, t_seen, kwargs),) = model.calls
    torch.testing.assert_close(x_t, q_sample(x0, t, noise, schedule))
    assert torch.equal(t_seen, t) and t_seen.dtype == torch.long
    assert kwargs.keys() == {"y"} and kwargs["y"] is y
    rescaled = Schedule.create("linear", 100, "", rescale_timesteps=True)
    diffusion_loss(model, x0, t % 100, noise, rescaled)
    torch.testing.assert_close(model.calls[-1][1], (t % 100).float() * 10)


def test_gradients_flow_to_a_small_model_and_vb_only_trains_sigma():
    schedule, x0, noise, t = _loss_inputs(26)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(C, 2 * C, 3, padding=1)
    model = lambda x, t: conv(x)  # noqa: E731
    terms = diffusion_loss(model, x0, t, noise, schedule, learn_sigma=True)
    terms.loss.mean().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    assert conv.weight.grad[:C].abs().sum() > 0 and conv.weight.grad[C:].abs().sum() > 0
    # the eps half of the network gets exactly the L_simple gradient: vb is stopped there
    mse = diffusion_loss(model, x0, t, noise, schedule, learn_sigma=True).mse
    (mse_grad,) = torch.autograd.grad(mse.mean(), conv.weight)
    torch.testing.assert_close(conv.weight.grad[:C], mse_grad[:C])
    assert (mse_grad[C:] == 0).all()


def test_loss_is_float32_for_bfloat16_model_output():
    schedule, x0, noise, t = _loss_inputs(27)
    out = torch.randn(B, 2 * C, H, W, generator=_gen(28)).clamp(-1, 1).bfloat16()
    terms = diffusion_loss(_Oracle(out), x0, t, noise, schedule, learn_sigma=True)
    assert terms.loss.dtype == terms.mse.dtype == terms.vb.dtype == torch.float32
    assert torch.isfinite(terms.loss).all()


# sample_timesteps


def test_sample_timesteps_are_uniform_in_range_and_seeded():
    t = sample_timesteps(4000, 7, _gen(30), "cpu")
    assert t.dtype == torch.long and t.shape == (4000,)
    assert t.min().item() == 0 and t.max().item() == 6
    counts = torch.bincount(t, minlength=7).double()
    assert (counts / 4000 - 1 / 7).abs().max().item() < 0.03
    assert torch.equal(sample_timesteps(64, 1000, _gen(31), "cpu"), sample_timesteps(64, 1000, _gen(31), "cpu"))
    assert not torch.equal(sample_timesteps(64, 1000, _gen(31), "cpu"), sample_timesteps(64, 1000, _gen(32), "cpu"))
    assert (sample_timesteps(3, 1, _gen(0)) == 0).all()
    with pytest.raises(ValueError):
        sample_timesteps(3, 0, _gen(0))
