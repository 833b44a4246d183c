"""Behaviour of GuidedSampler, the guided DDPM/DDIM steps and the guidance-scale policies.

Every expectation is derived from the math of the paper / ADM, not copied from a run. The networks
are tiny and deterministic (a few elementwise ops or one 5-way linear map on 3x8x8 images), so the
whole file runs in seconds on a CPU.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import fastguide as fg
from fastguide.schedule import StepCoefficients

C, S, K = 3, 8, 5  # channels, image size, classes


class ToyEps(nn.Module):
    """Eps-model ``(x, t, y=None)``: smooth in x and t; with ``learned_sigma`` a second half v in [-1, 1].

    ``v`` fixes the variance half to a constant instead (to hit the ends of the learned range).
    """

    def __init__(self, learned_sigma: bool = False, num_classes: int | None = None, v: float | None = None):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = C, S, num_classes
        self.learned_sigma, self.v = learned_sigma or v is not None, v
        self.calls, self.seen_t = 0, []

    def forward(self, x, t, y=None):
        assert (y is not None) == (self.num_classes is not None)
        self.calls += 1
        self.seen_t.append(t.clone())
        tt = t.float().view(-1, 1, 1, 1) / 1000
        eps = torch.tanh(0.7 * x + tt)
        if y is not None:
            eps = eps + 0.05 * (y.float().view(-1, 1, 1, 1) + 1)
        if not self.learned_sigma:
            return eps
        v = torch.tanh(x - 2 * tt) if self.v is None else torch.full_like(x, self.v)
        return torch.cat([eps, v], dim=1)


class ToyClassifier(nn.Module):
    """Noise-aware classifier ``(x, t) -> (B, K)``: a fixed random linear map, per-sample reductions only."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", 0.3 * torch.randn(K, C * S * S, generator=g))
        self.out_channels = K
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        logits = (x.flatten(1)[:, None, :] * self.weight).sum(-1)
        return logits * (1 + t.float().view(-1, 1) / 1000)


def schedule(respacing: str = "ddim5", steps: int = 1000, **kw) -> fg.Schedule:
    return fg.Schedule.create("linear", steps, respacing, **kw)


def sampler(model=None, clf="toy", policy=None, respacing="ddim5", **config) -> fg.GuidedSampler:
    model = ToyEps() if model is None else model
    clf = ToyClassifier() if clf == "toy" else clf
    return fg.GuidedSampler(model, clf, schedule(respacing), policy, fg.SamplerConfig(**config))


def x_T(seeds) -> torch.Tensor:
    return fg.PerSampleNoise(seeds, (C, S, S)).initial()


def state(t=(0,), entropy=(1.0,), grad_norm=(1.0,), num_timesteps=1000, num_classes=K) -> fg.GuidanceState:
    entropy = torch.tensor(entropy, dtype=torch.float32)
    return fg.GuidanceState(
        torch.tensor(t), num_timesteps, num_classes, entropy, torch.tensor(grad_norm), torch.zeros_like(entropy)
    )


METHODS = [
    pytest.param(dict(method="ddpm"), id="ddpm"),
    pytest.param(dict(method="ddim", eta=0.0), id="ddim-eta0"),
    pytest.param(dict(method="ddim", eta=0.5), id="ddim-eta0.5"),
]


def adm_pair() -> tuple[nn.Module, nn.Module]:
    """A tiny class-conditional ADM UNet (learned sigma) and classifier with perturbed (non-zero) weights."""
    from fastguide.adm import EncoderUNetModel, UNetModel

    g = torch.Generator().manual_seed(0)
    unet = UNetModel(S, C, 32, 2 * C, 1, (), channel_mult=(1,), num_classes=K)
    clf = EncoderUNetModel(S, C, 32, K, 1, (), channel_mult=(1,), pool="adaptive")
    with torch.no_grad():
        for p in [*unet.parameters(), *clf.parameters()]:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return unet.eval(), clf.eval()


# ---- per-sample seeds ----


@pytest.mark.parametrize("cfg", METHODS)
@pytest.mark.parametrize("nets", ["toy", "adm"])
def test_sample_depends_only_on_its_seed_and_label(cfg, nets):
    model, clf = adm_pair() if nets == "adm" else (ToyEps(num_classes=K), ToyClassifier())
    s = sampler(model, clf, fg.EntropyDriven(gamma=2.0), **cfg)
    full = s.sample(labels=[0, 1, 2], seeds=[3, 4, 5])
    swapped = s.sample(labels=[2, 0], seeds=[5, 3])
    alone = s.sample(labels=[1], seeds=[4])
    tight = dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(swapped.images, full.images[[2, 0]], **tight)
    torch.testing.assert_close(alone.images, full.images[[1]], **tight)
    torch.testing.assert_close(swapped.trace.scale, full.trace.scale[:, [2, 0]], **tight)
    assert not torch.allclose(full.images[0], full.images[1], atol=1e-3)  # seeds do matter


# ---- guidance off ----


@pytest.mark.parametrize("cfg", METHODS)
def test_no_guidance_policy_equals_sampler_without_classifier_and_never_calls_it(cfg):
    clf = ToyClassifier()
    plain = sampler(clf=None, **cfg).sample(labels=[0, 3], seeds=[1, 2])
    off = sampler(clf=clf, policy=fg.NoGuidance(), **cfg).sample(labels=[0, 3], seeds=[1, 2])
    assert torch.equal(off.images, plain.images)
    assert clf.calls == 0


def test_constant_zero_scale_equals_unguided_exactly_for_ddpm():
    clf = ToyClassifier()
    plain = sampler(clf=None, method="ddpm").sample(labels=[0, 3], seeds=[1, 2])
    zero = sampler(clf=clf, policy=fg.Constant(0.0), method="ddpm").sample(labels=[0, 3], seeds=[1, 2])
    assert clf.calls == 5  # the classifier did run, its gradient was scaled to zero
    assert torch.equal(zero.images, plain.images)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_constant_zero_scale_equals_unguided_to_rounding_for_ddim(eta):
    plain = sampler(clf=None, method="ddim", eta=eta).sample(labels=[0, 3], seeds=[1, 2])
    zero = sampler(policy=fg.Constant(0.0), method="ddim", eta=eta).sample(labels=[0, 3], seeds=[1, 2])
    torch.testing.assert_close(zero.images, plain.images, atol=1e-6, rtol=1e-6)


# ---- guidance acts, in the direction of the gradient ----


@pytest.mark.parametrize("cfg", METHODS)
def test_constant_guidance_changes_samples(cfg):
    plain = sampler(clf=None, **cfg).sample(labels=[0, 3], seeds=[1, 2])
    guided = sampler(policy=fg.Constant(2.0), **cfg).sample(labels=[0, 3], seeds=[1, 2])
    assert (guided.images - plain.images).abs().max() > 0.05


@pytest.mark.parametrize("cfg", METHODS)
def test_guidance_raises_classifier_probability_of_target_in_final_samples(cfg):
    clf, labels, seeds = ToyClassifier(), [0, 1, 2, 3, 4, 0, 1, 2], list(range(8))
    t0 = torch.zeros(len(labels), dtype=torch.long)

    def log_p_target(images):
        return fg.classifier_gradient(clf, images, t0, torch.tensor(labels)).log_prob.mean()

    plain = sampler(clf=None, **cfg).sample(labels, seeds=seeds)
    guided = sampler(clf=clf, policy=fg.Constant(5.0), **cfg).sample(labels, seeds=seeds)
    assert log_p_target(guided.images) > log_p_target(plain.images) + 0.5
    assert guided.trace.p_target[-1].mean() > guided.trace.p_target[0].mean()


def _step_pair(method, index, policy, eta=0.0, variance="auto"):
    """One step from the same x_t with and without guidance; returns (guided, unguided, x, y, index)."""
    x = x_T([7, 8])
    y, index = torch.tensor([1, 4]), torch.tensor(index)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    cfg = dict(method=method, eta=eta, variance=variance)
    guided, _ = sampler(policy=policy, **cfg).step(x, index, y, noise)
    plain, _ = sampler(clf=None, **cfg).step(x, index, y, noise)
    return guided, plain, x, y, index


def _grad(x, y, index, sched):
    return fg.classifier_gradient(ToyClassifier(), x, sched.original_timesteps(index), y)


def test_ddpm_guided_step_shifts_mean_by_variance_times_scaled_gradient():
    """Eq. 8: x_{t-1} = μ + σ²·s·∇log p(y|x_t) + σz, with σ² = β̃_t for fixed_small."""
    guided, plain, x, y, index = _step_pair("ddpm", [3, 3], fg.Constant(2.0), variance="fixed_small")
    sched = schedule()
    expected = StepCoefficients.of(sched.coefficients(index)).posterior_variance * 2.0 * _grad(x, y, index, sched).grad
    torch.testing.assert_close(guided.x_prev - plain.x_prev, expected, atol=1e-6, rtol=1e-5)


def test_ddim_guided_step_moves_along_the_gradient():
    """ADM's condition_score: ε̂ = ε − sqrt(1−ᾱ)·g, so x_{t-1} moves by
    g·sqrt(1−ᾱ)·(sqrt(1/ᾱ − 1)·sqrt(ᾱ_prev) − sqrt(1 − ᾱ_prev)), a positive multiple of g."""
    guided, plain, x, y, index = _step_pair("ddim", [3, 3], fg.Constant(2.0))
    sched = schedule()
    c = StepCoefficients.of(sched.coefficients(index))
    factor = (1 - c.alpha_bar).sqrt() * (
        c.sqrt_recipm1_alpha_bar * c.alpha_bar_prev.sqrt() - (1 - c.alpha_bar_prev).sqrt()
    )
    assert (factor > 0).all()
    expected = factor * 2.0 * _grad(x, y, index, sched).grad
    torch.testing.assert_close(guided.x_prev - plain.x_prev, expected, atol=1e-5, rtol=1e-4)


def test_eds_scale_is_a_constant_factor_on_the_raw_gradient():
    """No gradient flows through s: the shift is σ²·(γ log K / H)·∇log p(y|x), not ∇(s·log p)."""
    guided, plain, x, y, index = _step_pair("ddpm", [2, 2], fg.EntropyDriven(gamma=3.0), variance="fixed_small")
    sched = schedule()
    out = _grad(x, y, index, sched)
    s = 3.0 * math.log(K) / out.entropy
    expected = StepCoefficients.of(sched.coefficients(index)).posterior_variance * s.view(-1, 1, 1, 1) * out.grad
    torch.testing.assert_close(guided.x_prev - plain.x_prev, expected, atol=1e-6, rtol=1e-5)


# ---- DDIM guidance forms ----


def _ddim_step_inputs():
    g = torch.Generator().manual_seed(0)
    x, eps, grad = (torch.randn(2, C, S, S, generator=g) for _ in range(3))
    index = torch.tensor([3, 1])
    return x, eps, grad, index, schedule().coefficients(index), torch.ones(2)


def _ddim(x, eps, g, noise, coefs, nonzero, eta=0.0, paper_form=False):
    """The public DDIM update with guidance g (scale 1), clipping x̂0."""
    scale = None if g is None else torch.ones(len(x))
    return fg.guided_ddim_update(x, eps, g, scale, noise, coefs, nonzero, eta, True, paper_form)


def test_paper_ddim_guidance_equals_adm_form_with_gradient_over_sqrt_one_minus_alpha_bar():
    x, eps, g, index, coefs, nonzero = _ddim_step_inputs()
    c = StepCoefficients.of(coefs)
    paper = _ddim(x, eps, g, None, coefs, nonzero, paper_form=True)
    adm = _ddim(x, eps, g / (1 - c.alpha_bar).sqrt(), None, coefs, nonzero)
    torch.testing.assert_close(paper, adm)


def test_paper_and_adm_ddim_guidance_differ_for_the_same_gradient():
    x, eps, g, index, coefs, nonzero = _ddim_step_inputs()
    paper = _ddim(x, eps, g, None, coefs, nonzero, paper_form=True)
    adm = _ddim(x, eps, g, None, coefs, nonzero)
    assert (paper[0] - adm[0]).abs().max() > 1e-2


def test_stochastic_ddim_adds_sigma_times_noise():
    """DDIM Eq. 16: σ = η·sqrt((1−ᾱ_prev)/(1−ᾱ))·sqrt(1−ᾱ/ᾱ_prev); the noise enters as σ·z."""
    x, eps, z, index, coefs, nonzero = _ddim_step_inputs()
    c = StepCoefficients.of(coefs)
    with_z = _ddim(x, eps, None, z, coefs, nonzero, eta=0.5)
    without = _ddim(x, eps, None, torch.zeros_like(z), coefs, nonzero, eta=0.5)
    sigma = 0.5 * ((1 - c.alpha_bar_prev) / (1 - c.alpha_bar)).sqrt() * (1 - c.alpha_bar / c.alpha_bar_prev).sqrt()
    torch.testing.assert_close(with_z[0] - without[0], sigma * z)


def test_sampler_config_selects_the_ddim_guidance_form():
    run = lambda form: sampler(policy=fg.Constant(2.0), ddim_guidance=form).sample([0, 1], seeds=[0, 1]).images
    assert (run("paper") - run("adm")).abs().max() > 1e-3


# ---- policies ----


def test_constant_policy_gives_its_scale_to_every_sample():
    assert torch.equal(fg.Constant(2.5)(state(t=(0, 999), entropy=(0.1, 1.6))), torch.tensor([2.5, 2.5]))


def test_entropy_driven_scale_is_gamma_log_k_over_entropy():
    s = fg.EntropyDriven(gamma=4.0)(state(t=(1, 2), entropy=(math.log(K), 0.25)))
    torch.testing.assert_close(s, torch.tensor([4.0, 4.0 * math.log(K) / 0.25]))


def test_entropy_driven_floors_zero_entropy_to_a_finite_scale():
    s = fg.EntropyDriven(gamma=2.0, entropy_floor=1e-3)(state(entropy=(0.0,)))
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s, torch.tensor([2.0 * math.log(K) / 1e-3]))
    assert torch.isfinite(fg.EntropyDriven()(state(entropy=(0.0,)))).all()  # default floor


def test_entropy_driven_max_scale_caps_only_large_scales():
    s = fg.EntropyDriven(gamma=1.0, max_scale=3.0)(state(t=(0, 0), entropy=(math.log(K), 0.01)))
    torch.testing.assert_close(s, torch.tensor([1.0, 3.0]))


def test_sampler_hands_policies_detached_state():
    seen = []

    def spy(st):
        seen.append(st)
        return fg.EntropyDriven()(st)

    result = sampler(policy=spy).sample([0, 1], seeds=[0, 1])
    assert len(seen) == 5
    assert not any(t.requires_grad for st in seen for t in (st.entropy, st.grad_norm, st.log_prob))
    assert not result.trace.scale.requires_grad


def test_constant_range_uses_c_up_to_t_max_inclusive_and_base_above():
    s = fg.ConstantRange(c=3.0, t_max=700, base=1.5)(state(t=(0, 699, 700, 701, 999), entropy=(1.0,) * 5))
    assert torch.equal(s, torch.tensor([3.0, 3.0, 3.0, 1.5, 1.5]))


def test_timestep_aware_scale_is_c_times_remaining_steps():
    s = fg.TimestepAware(c=0.5)(state(t=(0, 500, 999), entropy=(1.0,) * 3, num_timesteps=1000))
    torch.testing.assert_close(s, torch.tensor([500.0, 250.0, 0.5]))


def test_gradient_norm_rescales_weak_gradients_only():
    """Paper text (Sect. 4.3): a norm below M is weak and gets c; a norm at or above M keeps base."""
    policy = fg.GradientNorm(c=10.0, threshold=0.2, base=1.0)
    s = policy(state(t=(0,) * 4, entropy=(1.0,) * 4, grad_norm=(0.0, 0.1999, 0.2, 5.0)))
    assert torch.equal(s, torch.tensor([10.0, 10.0, 1.0, 1.0]))


def test_user_policy_function_is_used_and_traced():
    def by_timestep(st: fg.GuidanceState) -> torch.Tensor:
        return 1.0 + st.t.float() / 100

    result = sampler(policy=by_timestep).sample([0, 1], seeds=[0, 1])
    expected = (1.0 + result.trace.t.float() / 100)[:, None].expand(-1, 2)
    torch.testing.assert_close(result.trace.scale, expected)


# ---- the trace ----


@pytest.fixture
def traced():
    clf = ToyClassifier()
    s = sampler(clf=clf, policy=fg.ConstantRange(c=3.0, t_max=700, base=1.0), respacing="5", method="ddpm")
    return s, clf, s.sample(labels=[1, 4, 2], seeds=[10, 11, 12])


def test_trace_shapes_are_steps_by_batch(traced):
    s, _, result = traced
    assert result.trace.t.shape == (5,)
    for field in ("entropy", "scale", "grad_norm", "p_target"):
        assert getattr(result.trace, field).shape == (5, 3), field


def test_trace_timesteps_are_the_respaced_map_reversed(traced):
    s, _, result = traced
    assert result.trace.t.tolist() == list(reversed(s.schedule.timestep_map))
    assert result.trace.t.tolist() == [999, 749, 500, 250, 0]


def test_trace_scale_follows_the_policy(traced):
    _, _, result = traced
    expected = torch.where(result.trace.t <= 700, 3.0, 1.0)[:, None].expand(-1, 3)
    assert torch.equal(result.trace.scale, expected)


def test_trace_p_target_is_the_target_class_probability(traced):
    _, clf, result = traced
    p = result.trace.p_target
    assert ((p > 0) & (p <= 1)).all()
    logits = clf(x_T([10, 11, 12]), torch.full((3,), 999))
    torch.testing.assert_close(p[0], logits.softmax(-1)[torch.arange(3), torch.tensor([1, 4, 2])])


def test_trace_grad_norm_at_first_step_matches_classifier_gradient(traced):
    _, clf, result = traced
    out = fg.classifier_gradient(clf, x_T([10, 11, 12]), torch.full((3,), 999), torch.tensor([1, 4, 2]))
    torch.testing.assert_close(result.trace.grad_norm[0], out.grad.flatten(1).norm(dim=1))
    torch.testing.assert_close(result.trace.entropy[0], -(out.logits.softmax(-1) * out.logits.log_softmax(-1)).sum(-1))


def test_trace_of_unguided_sampling_has_only_timesteps():
    result = sampler(clf=None).sample([0, 1], seeds=[0, 1])
    assert result.trace.t.tolist() == [800, 600, 400, 200, 0]
    assert result.trace.entropy is result.trace.scale is result.trace.grad_norm is result.trace.p_target is None


def test_networks_see_rescaled_timesteps_but_trace_and_policy_keep_original_ones():
    model, clf = ToyEps(), ToyClassifier()
    sched = schedule("ddim5", steps=500, rescale_timesteps=True)
    result = fg.GuidedSampler(model, clf, sched, fg.TimestepAware(c=1.0)).sample([0], seeds=[0])
    assert result.trace.t.tolist() == [400, 300, 200, 100, 0]
    assert [t.item() for t in model.seen_t] == [800.0, 600.0, 400.0, 200.0, 0.0]
    assert result.trace.scale[:, 0].tolist() == [100.0, 200.0, 300.0, 400.0, 500.0]  # T − t with T = 500


# ---- callback ----


def test_callback_is_called_once_per_step_in_order():
    calls = []
    result = sampler(method="ddpm").sample([0, 1], seeds=[0, 1], callback=lambda *a: calls.append(a))
    assert [k for k, _, _ in calls] == [0, 1, 2, 3, 4]
    assert all(isinstance(out, fg.StepOutput) and isinstance(rec, fg.StepRecord) for _, out, rec in calls)
    assert [rec.t[0].item() for _, _, rec in calls] == result.trace.t.tolist()
    assert torch.equal(calls[-1][1].x_prev, result.images)
    torch.testing.assert_close(torch.stack([rec.scale for _, _, rec in calls]), result.trace.scale)


# ---- DDPM variances ----


def _ddpm(model, variance, clf="toy"):
    """Images of a 5-step DDPM run (EDS-guided unless clf is None)."""
    s = sampler(model=model, clf=clf, respacing="5", method="ddpm", variance=variance)
    return s.sample([0, 3], seeds=[5, 6]).images


def test_ddpm_variance_types_all_run_and_differ():
    variances = ("learned_range", "learned", "fixed_small", "fixed_large")
    images = {v: _ddpm(ToyEps(learned_sigma=True), v) for v in variances}
    assert all(torch.isfinite(im).all() for im in images.values())
    for a, b in itertools.combinations(variances, 2):
        assert (images[a] - images[b]).abs().max() > 1e-3, (a, b)


def test_auto_variance_is_learned_range_for_2c_outputs_and_fixed_large_for_c():
    assert torch.equal(_ddpm(ToyEps(learned_sigma=True), "auto"), _ddpm(ToyEps(learned_sigma=True), "learned_range"))
    assert torch.equal(_ddpm(ToyEps(), "auto"), _ddpm(ToyEps(), "fixed_large"))


def test_learned_range_ends_are_the_fixed_variances():
    """Improved DDPM Eq. 15: v = −1 gives log β̃_t, v = +1 gives log β_t (unguided, so t = 0 adds no noise)."""
    assert torch.equal(_ddpm(ToyEps(v=-1.0), "learned_range", clf=None), _ddpm(ToyEps(), "fixed_small", clf=None))
    assert torch.equal(_ddpm(ToyEps(v=1.0), "learned_range", clf=None), _ddpm(ToyEps(), "fixed_large", clf=None))


# ---- per-sample timesteps in one step ----


@pytest.mark.parametrize("cfg", [dict(method="ddpm"), dict(method="ddim", eta=0.5)], ids=["ddpm", "ddim"])
def test_step_with_per_sample_indices_equals_each_sample_alone(cfg):
    s = sampler(model=ToyEps(learned_sigma=True, num_classes=K), policy=fg.EntropyDriven(gamma=2.0), **cfg)
    x, y = x_T([1, 2]), torch.tensor([3, 0])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    both, rec = s.step(x, torch.tensor([4, 2]), y, noise)
    for i, idx in enumerate([4, 2]):
        one, rec1 = s.step(x[i : i + 1], torch.tensor([idx]), y[i : i + 1], noise[i : i + 1])
        torch.testing.assert_close(both.x_prev[i : i + 1], one.x_prev, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(both.pred_xstart[i : i + 1], one.pred_xstart, atol=1e-6, rtol=1e-6)
        assert rec.t[i] == rec1.t[0] == s.schedule.timestep_map[idx]
        torch.testing.assert_close(rec.scale[i : i + 1], rec1.scale, atol=1e-6, rtol=1e-6)


# ---- numerics and modes added after review ----


class _ConfidentClassifier(nn.Module):
    """Logits with a huge margin for class 0 and −inf for class K−1 (a masked class)."""

    out_channels = K

    def forward(self, x, t):
        logits = torch.zeros(x.shape[0], K) + 1e-3 * x.flatten(1)[:, :K]
        logits[:, 0] += 200.0
        logits[:, K - 1] = -math.inf
        return logits


def test_minus_inf_logits_are_allowed_and_give_finite_entropy():
    result = sampler(clf=_ConfidentClassifier(), policy=fg.Constant(1.0)).sample([0, 1], seeds=[0, 1])
    assert torch.isfinite(result.trace.entropy).all() and torch.isfinite(result.images).all()


def test_entropy_below_the_floor_warns_and_max_scale_caps_the_scale():
    s = sampler(clf=_ConfidentClassifier(), policy=fg.EntropyDriven(gamma=2.0))
    with pytest.warns(UserWarning, match="below the EDS floor"):
        s.sample([0], seeds=[0])
    capped = sampler(clf=_ConfidentClassifier(), policy=fg.EntropyDriven(gamma=2.0, max_scale=50.0))
    with pytest.warns(UserWarning, match="below the EDS floor"):
        result = capped.sample([0], seeds=[0])
    assert result.trace.scale.max().item() == 50.0


def test_user_policy_with_gradient_is_detached():
    def policy(state):
        return torch.full_like(state.entropy, 2.0).requires_grad_(True) * 1.0

    records = []
    sampler(policy=policy).sample([1], seeds=[0], callback=lambda k, out, rec: records.append(rec))
    assert all(not r.scale.requires_grad for r in records)
    assert not any(r.scale.grad_fn for r in records)


def test_sampling_works_under_inference_mode_and_no_grad():
    s = sampler(policy=fg.Constant(2.0))  # networks built outside inference mode, as usual
    reference = s.sample([1, 2], seeds=[0, 1]).images
    with torch.inference_mode():
        inside = s.sample([1, 2], seeds=[0, 1]).images
    with torch.no_grad():
        no_grad = s.sample([1, 2], seeds=[0, 1]).images
    assert torch.equal(reference, inside.clone()) and torch.equal(reference, no_grad)


class _WideEps(nn.Module):
    """An eps-model whose x̂_0 predictions leave [−1, 1], so clipping matters."""

    in_channels, image_size, num_classes = C, S, None

    def forward(self, x, t):
        return -3.0 * torch.tanh(x)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_clip_denoised_false_differs_and_keeps_unclipped_predictions(method):
    seen = {}
    for clip in (True, False):
        xs = []
        # unguided: with guidance, DDIM's guided x̂_0 is re-derived from ε̂ and not clipped again (ADM)
        s = sampler(model=_WideEps(), clf=None, method=method, clip_denoised=clip)
        s.sample([1], seeds=[0], callback=lambda k, out, rec: xs.append(out.pred_xstart))
        seen[clip] = xs
    assert all(x.abs().max() <= 1 for x in seen[True])
    assert any(x.abs().max() > 1 for x in seen[False])


def test_progress_bar_is_shown_when_asked(capsys):
    sampler(policy=fg.Constant(1.0), progress=True).sample([1], seeds=[0])
    err = capsys.readouterr().err
    assert "sampling" in err and "5/5" in err


def test_fp16_adm_unet_samples_like_the_float32_one():
    def unet(use_fp16):
        torch.manual_seed(0)
        m = fg.adm.UNetModel(8, 3, 32, 6, 1, (), channel_mult=(1,), use_fp16=use_fp16)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        return m.eval()

    full = sampler(model=unet(False), policy=fg.Constant(1.0)).sample([1], seeds=[0]).images
    half = sampler(model=unet(True), policy=fg.Constant(1.0)).sample([1], seeds=[0]).images
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0, atol=5e-2)


@pytest.mark.parametrize("field, value", [("clip_denoised", "no"), ("check_finite", "False"), ("progress", 1),
                                          ("clip_denoised", None), ("eta", True), ("eta", "0.5")])  # fmt: skip
def test_sampler_config_refuses_truthy_stand_ins_for_booleans_and_numbers(field, value):
    """A string is truthy and True is 1 to arithmetic: neither may pass as a bool or as eta."""
    with pytest.raises(ValueError, match=rf"{field} must be .*got {value!r}"):
        fg.SamplerConfig(**{field: value})


def test_sampler_config_takes_numpy_booleans_and_numbers():
    import numpy as np

    config = fg.SamplerConfig(clip_denoised=np.bool_(False), eta=np.float32(0.5))
    assert config.clip_denoised is False and config.eta == 0.5


@pytest.mark.parametrize("make", [lambda: fg.Constant(1e300), lambda: fg.EntropyDriven(1e39),
                                  lambda: fg.ConstantRange(c=-1e39), lambda: fg.Constant("3")],
                         ids=["1e300", "1e39", "-1e39", "string"])  # fmt: skip
def test_a_strength_beyond_float32_is_refused_when_the_policy_is_made(make):
    with pytest.raises(ValueError, match=r"must be a finite float32 number .* got"):
        make()


class Sharp(ToyClassifier):
    """A classifier whose gradient is large (1e3 times the toy's)."""

    def forward(self, x, t):
        return 1e3 * super().forward(x, t)


def test_a_guidance_that_overflows_the_update_is_named_as_such():
    """A finite scale times a finite gradient beyond float32: the update is blamed, not the next step's model."""
    s = sampler(clf=Sharp(), policy=fg.Constant(3e38))
    with pytest.raises(FloatingPointError, match=r"the guided update gave (nan|-?inf) for sample \d at step 0 .*too large "
                       "for float32"):  # fmt: skip
        s.sample([1, 2], seeds=[0, 1])


class Overflows(ToyEps):
    """NaN for inputs beyond 1e20 (as a real network's GroupNorm overflows)."""

    def forward(self, x, t, y=None):
        out = super().forward(x, t, y)
        return torch.where(x.abs().amax(dim=(1, 2, 3), keepdim=True) > 1e20, math.nan, out)


def test_a_network_that_fails_after_a_huge_update_says_which_guidance_came_before():
    s = sampler(model=Overflows(), policy=fg.Constant(1e30))
    with pytest.raises(FloatingPointError, match=r"eps-model output is nan for sample 0 at step 1 .* the step before "
                       r"applied guidance s = 1e\+30 with ‖s·∇‖ = .* lower the guidance scale"):  # fmt: skip
        s.sample([1, 2], seeds=[0, 1])
