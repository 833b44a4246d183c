"""DPM-Solver++(2M), UniPC and DPM-Solver++(3M) (fastguide.solvers) against diffusers' schedulers and a float64 run.

* Guidance off: fastguide's float32 trajectory follows diffusers' ``DPMSolverMultistepScheduler`` /
  ``UniPCMultistepScheduler`` step by step on the same eps-model (a small ADM UNet with learned sigma,
  whose variance channels both ignore).
* Guidance on (every policy goes through ε − sqrt(1−ᾱ)·s·∇): fastguide against an independent float64
  run of the solvers' formulas written here from the papers, judged by the project's float64 rule
  (error ≤ 2 × a float32 run's own error + 1e-6). The float32 run is made at this thread count and at
  another (:func:`_float32_runs`), and the larger of their errors is the yardstick: one run's error is one
  draw of the rounding, and judged by it alone the guided test failed at one thread (5 of 12 cases, by up
  to 1.4×) and passed at two.
"""

from __future__ import annotations

import copy
import math
import re
import types

import pytest
import torch
from adm_reference import VARIANTS, _threads
from golden_cases import assert_float64_parity, rel_err

import fastguide as fg
from fastguide.adm.flags import ClassifierFlags, ModelFlags
from fastguide.schedule import linear_betas
from fastguide.solvers import multistep_table, predictor_order, threshold
from fastguide.step import guidance_plan

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (setup.py's test extra)")

STEPS = 10
SCHEDULERS = {"dpmpp2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
              "dpmpp3m": "DPMSolverMultistepScheduler"}
SOLVER_ORDER = {"dpmpp3m": 3}  # diffusers' solver_order (else 2)


def _randomised(net: torch.nn.Module, seed: int, gain: float) -> torch.nn.Module:
    """ADM zero-initialises its output layers (ε = 0 at init): give every weight a small random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (gain / math.sqrt(max(p[0].numel(), 1))))
    return net.eval()


class _Denoiser(torch.nn.Module):
    """An eps-model with learned sigma that denoises: the exact ε of Gaussian data N(μ, 0.5²) (μ a bright
    square on black, so that clipping acts), plus a small random ADM UNet, in the input's dtype."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet, self.in_channels, self.image_size = unet, 1, 16
        mu = -torch.ones(1, 1, 16, 16, dtype=torch.float64)
        mu[..., 4:12, 5:11] = 0.9
        self.register_buffer("mu", mu)
        self.register_buffer("alpha_bar", torch.from_numpy(linear_betas(1000)).neg().add(1).cumprod(0))

    def forward(self, x, t):
        ab = self.alpha_bar[t].to(x.dtype).view(-1, 1, 1, 1)
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
        exact = sigma * (x - alpha * self.mu.to(x.dtype)) / (0.25 * ab + 1 - ab)
        out = self.unet(x, t)
        return torch.cat([exact + out[:, :1], out[:, 1:]], dim=1)


@pytest.fixture(scope="module")
def nets():
    unet = ModelFlags(image_size=16, in_channels=1, num_channels=32, channel_mult="1,2", num_res_blocks=1,
                      attention_resolutions="8", learn_sigma=True).build()  # fmt: skip
    clf = ClassifierFlags(image_size=16, in_channels=1, num_classes=4, classifier_width=32, classifier_depth=1,
                          classifier_attention_resolutions="8", channel_mult="1,2").build()  # fmt: skip
    return _Denoiser(_randomised(unet, 0, 3.0)).eval(), _randomised(clf, 1, 1.0)


def _x_T(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(7))


def _schedule(timesteps=None, steps=STEPS) -> fg.Schedule:
    """The linear schedule kept at ``timesteps`` (default: DDIM's stride, range(0, 1000, 1000 // steps))."""
    kept = range(0, 1000, 1000 // steps) if timesteps is None else timesteps
    return fg.Schedule.respaced(linear_betas(1000), list(kept))


def _fastguide(unet, clf, method, policy=None, x_T=None, schedule=None, **config) -> list[torch.Tensor]:
    """fastguide's sample after every step (float32)."""
    x_T = _x_T() if x_T is None else x_T
    sampler = fg.GuidedSampler(unet, clf, schedule or _schedule(), policy,
                               fg.SamplerConfig(method=method, **config), num_classes=4)  # fmt: skip
    run = sampler.steps([0, 1, 3], noise=fg.FixedNoise(x_T))
    return [out.x_prev for _, out, _ in run]


def _diffusers_scheduler(method, steps=STEPS, **options):
    scheduler = getattr(diffusers, SCHEDULERS[method])(
        num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="leading", steps_offset=0,
        solver_order=SOLVER_ORDER.get(method, 2), lower_order_final=True, final_sigmas_type="zero", **options,
    )  # fmt: skip
    scheduler.set_timesteps(steps)
    return scheduler


def _diffusers(unet, method, x_T, steps=STEPS, **options) -> list[torch.Tensor]:
    """diffusers' scheduler and the same eps-model: the sample after every step."""
    scheduler = _diffusers_scheduler(method, steps, **options)
    x, out = x_T.clone(), []
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(x, t.expand(len(x)))[:, :1]  # the variance channel is ignored
            x = scheduler.step(eps, t, x).prev_sample
            out.append(x)
    return out


# ---- an independent float64 run of the same formulas ----


def _f64(net: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of an ADM network: ADM computes the timestep embedding and GroupNorm in float32 and
    runs its torso in ``net.dtype``; here all of them run in float64."""
    net = copy.deepcopy(net).double()
    inner = net.unet if isinstance(net, _Denoiser) else net
    inner.dtype = torch.float64
    for module in inner.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.forward = types.MethodType(torch.nn.GroupNorm.forward, module)
    inner.time_embed.register_forward_pre_hook(lambda module, args: tuple(a.double() for a in args))
    return net


def _float32_runs(unet, clf, method, x_T, y, **kw) -> list[dict[str, torch.Tensor]]:
    """The float32 :func:`_reference` at every step, at this thread count and at another (the first two of
    ``adm_reference.VARIANTS``): the same formulas with other roundings. The channels-last variant of the
    golden tests is left out: its convolutions err up to 4× more on these networks, and with it a γ off by
    1e-3 passed 9 of the 12 guided cases (with these two runs, 1 or 2 of 12, at one and two threads)."""
    runs = {}
    for name in ("ADM here", "ADM here, other thread count"):
        threads, _ = VARIANTS[name]
        with _threads(threads):
            runs[name.replace("ADM here", "float32 run")] = _reference(unet, clf, method, x_T, y, **kw)
    return [{name: run[k] for name, run in runs.items()} for k in range(len(runs["float32 run"]))]


def _reference(unet, clf, method, x_T, y, gamma=None, clip=True, plan=None, paper_form=False, schedule=None
               ) -> list[torch.Tensor]:  # fmt: skip
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, multistep), DPM-Solver++(3M) (ibid., the third-order
    multistep update, :func:`_dpm3`) or UniPC-bh2 (Zhao et al. 2023: UniP-p with UniC-p, ρ from their linear
    system), in x's dtype, with EDS guidance as ADM's DDIM applies it."""
    schedule = schedule or _schedule()
    ts = list(reversed(schedule.timestep_map))
    ab = schedule.table("alpha_bar").flip(0).to(x_T.dtype)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    lam = torch.log(alpha / sigma)
    n, x, traj = len(ts), x_T.clone(), []
    x0s, x_prev = [], None
    s_g = None
    for k, t in enumerate(ts):
        tt = torch.full((len(x),), t, dtype=torch.long)
        with torch.no_grad():
            eps = unet(x, tt)[:, :1]
        action = "call" if plan is None else plan[k]
        if gamma is not None and action == "call":
            with torch.enable_grad():
                xi = x.detach().requires_grad_(True)
                logp = torch.log_softmax(clf(xi, tt), dim=1)
                (grad,) = torch.autograd.grad(logp[torch.arange(len(y)), y].sum(), xi)
            p = logp.detach().exp()
            entropy = -(p * logp.detach()).sum(1)
            s = gamma * math.log(logp.shape[1]) / entropy.clamp_min(1e-6)
            s_g = s.view(-1, 1, 1, 1) * grad
        if gamma is not None and action != "off":
            eps = eps - (1 if paper_form else sigma[k]) * s_g
        x0 = (x - sigma[k] * eps) / alpha[k]
        x0 = x0.clamp(-1, 1) if clip else x0
        if method == "unipc" and k > 0:  # UniC: the new output corrects the sample the last predictor made
            x = _uni(x_prev, x0s, x0, alpha[k], sigma[k], sigma[k - 1], lam, k, predictor_order(k - 1, n), True)
        x0s.append(x0)
        x_prev = x
        if k == n - 1:  # to σ = 0: the data prediction itself
            x = x0
        elif method == "dpmpp3m":
            x = _dpm3(x, x0s, alpha[k + 1], sigma[k + 1], sigma[k], lam, k, n)
        else:
            x = _uni(x, x0s, None, alpha[k + 1], sigma[k + 1], sigma[k], lam, k + 1, predictor_order(k, n), False)
        traj.append(x)
    return traj


def _dpm3(x, x0s, alpha_t, sigma_t, sigma_s, lam, k, n):
    """DPM-Solver++(3M) from grid point k to k+1, of order 1 at the first step, 2 at the second (and the
    second-to-last of fewer than 15), else 3, with first and second differences of the last three x̂0."""
    h = lam[k + 1] - lam[k]
    em1 = torch.expm1(-h)
    m0 = x0s[-1]
    out = sigma_t / sigma_s * x - alpha_t * em1 * m0
    order = 1 if k == 0 else 2 if k == 1 or (k == n - 2 and n < 15) else 3
    if order == 1:
        return out
    r0 = (lam[k] - lam[k - 1]) / h
    d1_0 = (m0 - x0s[-2]) / r0
    if order == 2:
        return out - 0.5 * alpha_t * em1 * d1_0
    r1 = (lam[k - 1] - lam[k - 2]) / h
    d1_1 = (x0s[-2] - x0s[-3]) / r1
    first, second = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)
    return out + alpha_t * (em1 / h + 1) * first - alpha_t * ((em1 + h) / h**2 - 0.5) * second


def _uni(x, x0s, x0_new, alpha_t, sigma_t, sigma_s, lam, k, order, corrector):
    """UniP (corrector False) or UniC (True) of order ``order`` to grid point k from point k−1 (bh2)."""
    h = lam[k] - lam[k - 1]
    hh = -h
    phi = torch.expm1(hh)
    b_h = phi
    m0 = x0s[-1]
    base = sigma_t / sigma_s * x - alpha_t * phi * m0
    # r_i and D_i for the older outputs (k−2, ...) used by this order
    rks = [(lam[k - 1 - i] - lam[k - 1]) / h for i in range(1, order)]
    ds = [(x0s[-1 - i] - m0) / rks[i - 1] for i in range(1, order)]
    if corrector:
        rks.append(torch.ones((), dtype=x.dtype))
        ds.append(x0_new - m0)
    if not ds:
        return base
    # b_i = h φ_{i+1}(h)·i!/B(h), φ_{k+1}(h) = (φ_k(h) − 1/k!)/h (hh in place of h)
    g, hphi, fact = [], phi / hh - 1, 1
    for i in range(1, len(ds) + 1):
        g.append(hphi * fact / b_h)
        fact *= i + 1
        hphi = hphi / hh - 1 / fact
    matrix = torch.stack([torch.stack(rks) ** i for i in range(len(ds))])
    g = torch.stack(g)
    rho = torch.full((1,), 0.5, dtype=x.dtype) if len(ds) == 1 else torch.linalg.solve(matrix, g)
    return base - alpha_t * b_h * sum(r * d for r, d in zip(rho, ds))


# ---- tests ----


def test_second_order_unip_is_dpm_solver_pp_2m_and_only_the_corrector_differs():
    schedule = fg.Schedule.create("linear", 1000, "ddim10")
    dpm, uni = multistep_table(schedule, "dpmpp2m"), multistep_table(schedule, "unipc")
    torch.testing.assert_close(dpm[:, :3], uni[:, :3], rtol=0, atol=0)  # predictor: a, b, c
    assert (dpm[:, 3] == 1).all() and (dpm[:, 4:] == 0).all()  # no corrector
    assert uni[-1, 3] == 1 and (uni[:-1, 3] == 0).all()  # UniC from the second step on
    # first order at the first step (no history) and the last (to σ = 0, where x_next = x̂0)
    assert dpm[-1, 2] == 0 and dpm[0, 2] == 0 and (dpm[1:-1, 2] != 0).all()
    assert dpm[0, 0] == 0 and dpm[0, 1] == 1


@pytest.mark.parametrize("method", list(SCHEDULERS))
@pytest.mark.parametrize("threshold", ["clip", "dynamic"])
def test_follows_diffusers_step_by_step_without_guidance(nets, method, threshold):
    unet, _ = nets
    x_T = _x_T()
    options = dict(thresholding=True, sample_max_value=1.0)  # max 1: ADM's clip to [−1, 1]
    config = {}
    if threshold == "dynamic":
        options = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.3)
        config = dict(dynamic_threshold=0.9, threshold_max=1.3)
    schedule = _schedule(sorted(_diffusers_scheduler(method).timesteps.tolist()))  # diffusers' own timesteps
    assert schedule.num_steps == STEPS and max(schedule.timestep_map) == 900
    ours = _fastguide(unet, None, method, schedule=schedule, **config)
    theirs = _diffusers(unet, method, x_T, **options)
    if threshold == "clip":
        exact = _reference(_f64(unet), None, method, x_T.double(), None, schedule=schedule)
        f32 = _float32_runs(unet, None, method, x_T, None, schedule=schedule)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        scale = b.abs().max()
        assert (a - b).abs().max() <= 1e-4 * scale, f"{method} step {k}: {float((a - b).abs().max()):.3g} from diffusers"
        if threshold == "clip":  # the float64 run agrees with diffusers (so it is a reference for the next test)
            assert rel_err(b, exact[k]) < 1e-4, f"{method} step {k}: diffusers vs float64 {rel_err(b, exact[k]):.3g}"
            assert_float64_parity(f"{method} step {k}", a, exact[k], {"diffusers": b, **f32[k]}, record=False)
    assert ours[-1].abs().max() <= (1 if threshold == "clip" else 1.3) + 1e-6
    unclipped = _fastguide(unet, None, method, schedule=schedule, clip_denoised=False)
    assert rel_err(unclipped[-1], ours[-1]) > 0.1, "clipping x̂0 changed nothing: the test would not see it"


@pytest.mark.parametrize("steps", [STEPS, 15, 25])  # 15 and more: third order also at the second-to-last step
def test_dpmpp3m_follows_diffusers_and_float64_at_each_order_rule(nets, steps):
    """DPM-Solver++(3M) without guidance on diffusers' own timesteps: within 1e-4 of diffusers' float32 run at
    every step, and within the float64 rule of an independent float64 run; third order makes a difference
    (it is not DPM-Solver++(2M) under another name)."""
    unet, _ = nets
    x_T = _x_T()
    schedule = _schedule(sorted(_diffusers_scheduler("dpmpp3m", steps).timesteps.tolist()))
    assert schedule.num_steps == steps
    ours = _fastguide(unet, None, "dpmpp3m", schedule=schedule)
    theirs = _diffusers(unet, "dpmpp3m", x_T, steps, thresholding=True, sample_max_value=1.0)
    exact = _reference(_f64(unet), None, "dpmpp3m", x_T.double(), None, schedule=schedule)
    f32 = _float32_runs(unet, None, "dpmpp3m", x_T, None, schedule=schedule)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max(), f"step {k}: {float((a - b).abs().max()):.3g} from diffusers"
        assert_float64_parity(f"dpmpp3m {steps} steps, step {k}", a, exact[k], {"diffusers": b, **f32[k]},
                              record=False)  # fmt: skip
    second = _fastguide(unet, None, "dpmpp2m", schedule=schedule)
    assert rel_err(ours[-2], second[-2]) > 1e-4, "3M gave 2M's samples"
    table = multistep_table(schedule, "dpmpp3m")
    third = (table[:, 3] != 0).flip(0).tolist()  # f != 0: third order, by step
    assert third == [False, False, *[True] * (steps - (4 if steps < 15 else 3)), *[False] * (2 if steps < 15 else 1)]


def test_dynamic_thresholding_is_diffusers_where_the_quantile_lies_inside_its_range():
    """Per sample: s = the ratio quantile of |x̂0| clamped to [1, max]; x̂0 clamped to [−s, s] and divided by s.
    Samples are made so that s falls below 1, inside [1, max] and above max."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 1, 16, 16, generator=gen) * torch.tensor([0.3, 1.0, 1.2, 6.0]).view(-1, 1, 1, 1)
    scheduler = getattr(diffusers, SCHEDULERS["dpmpp2m"])(thresholding=True, dynamic_thresholding_ratio=0.9,
                                                          sample_max_value=2.5)  # fmt: skip
    s = torch.quantile(x0.abs().flatten(1), 0.9, dim=1)
    assert (s < 1).any() and ((s > 1) & (s < 2.5)).sum() >= 2 and (s > 2.5).any()
    torch.testing.assert_close(threshold(x0, True, 0.9, 2.5), scheduler._threshold_sample(x0), rtol=0, atol=1e-6)
    torch.testing.assert_close(threshold(x0, True, None, 2.5), x0.clamp(-1, 1), rtol=0, atol=0)
    torch.testing.assert_close(threshold(x0, False, None, 2.5), x0, rtol=0, atol=0)


@pytest.mark.parametrize("method", list(SCHEDULERS))
@pytest.mark.parametrize("variant", ["eds", "eds_paper_form", "every_2", "interval"])
def test_guided_matches_a_float64_run_of_the_same_formulas(nets, method, variant):
    unet, clf = nets
    x_T, y = _x_T(), torch.tensor([0, 1, 3])
    config = {"eds_paper_form": dict(ddim_guidance="paper"), "every_2": dict(guidance_every=2),
              "interval": dict(guidance_interval=(200, 600))}.get(variant, {})  # fmt: skip
    schedule = _schedule()
    plan = guidance_plan(list(reversed(schedule.timestep_map)), config.get("guidance_interval"),
                         config.get("guidance_every", 1))  # fmt: skip
    kw = dict(gamma=2.0, plan=plan, paper_form=variant == "eds_paper_form")
    ours = _fastguide(unet, clf, method, fg.EntropyDriven(gamma=2.0), **config)
    exact = _reference(_f64(unet), _f64(clf), method, x_T.double(), y, **kw)
    f32 = _float32_runs(unet, clf, method, x_T, y, **kw)
    unguided = _fastguide(unet, None, method)
    assert rel_err(ours[-1], unguided[-1]) > 1e-2, "guidance did not change the sample"
    for k in range(STEPS):
        assert_float64_parity(f"{method} {variant} step {k}", ours[k], exact[k], f32[k], record=False)


def test_guidance_plan():
    ts = [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert guidance_plan(ts, None, 1) == ["call"] * 10
    assert guidance_plan(ts, None, 3) == ["call", "reuse", "reuse"] * 3 + ["call"]
    assert guidance_plan(ts, (200, 600), 2) == ["off"] * 3 + ["call", "reuse", "call", "reuse", "call"] + ["off"] * 2


def test_interval_steps_use_no_classifier_and_reused_steps_call_it_less(nets):
    unet, clf = nets
    calls = []
    counted = _Counting(clf, calls)
    for config, expected in [({}, STEPS), (dict(guidance_every=3), 4), (dict(guidance_interval=(200, 600)), 5)]:
        calls.clear()
        sampler = fg.GuidedSampler(unet, counted, fg.Schedule.create("linear", 1000, f"ddim{STEPS}"),
                                   fg.EntropyDriven(2.0), fg.SamplerConfig(method="unipc", **config), num_classes=4)  # fmt: skip
        result = sampler.sample([0, 1, 2], seeds=[0, 1, 2])
        assert len(calls) == expected, config
        called = torch.tensor([a == "call" for a in sampler.guidance_plan()])
        assert result.trace.entropy[called].isfinite().all() and result.trace.entropy[~called].isnan().all()
        if "guidance_interval" in config:
            off = torch.tensor([a == "off" for a in sampler.guidance_plan()])
            assert (result.trace.scale[off] == 0).all()


class _Counting(torch.nn.Module):
    def __init__(self, net, calls):
        super().__init__()
        self.net, self.calls, self.out_channels = net, calls, 4

    def forward(self, x, t):
        self.calls.append(int(t[0]))
        return self.net(x, t)


@pytest.mark.parametrize("bad, message", [
    (dict(method="euler"), "unknown method"),
    (dict(method="unipc", eta=0.5), "eta=0.5 applies to method 'ddim' only"),
    (dict(method="ddim", dynamic_threshold=0.99), "dynamic_threshold applies to"),
    (dict(method="unipc", dynamic_threshold=1.5), "quantile in (0, 1], got 1.5"),
    (dict(method="unipc", threshold_max=0.5), "threshold_max must be a finite number >= 1, got 0.5"),
    (dict(guidance_interval=(600, 200)), "guidance_interval must be two original timesteps"),
    (dict(guidance_every=0), "guidance_every must be an integer >= 1, got 0"),
    (dict(method="unipc", dynamic_threshold=True), "quantile in (0, 1], got True"),
    (dict(method="unipc", threshold_max=2.0), "threshold_max=2.0 applies only with dynamic_threshold"),
    (dict(method="unipc", dynamic_threshold=0.9, clip_denoised=False), "cannot go with clip_denoised=False"),
])  # fmt: skip
def test_bad_settings_are_named(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fg.SamplerConfig(**bad)


def test_an_interval_without_steps_and_a_single_step_call_are_refused(nets):
    unet, clf = nets
    schedule = fg.Schedule.create("linear", 1000, f"ddim{STEPS}")
    sampler = fg.GuidedSampler(unet, clf, schedule, fg.EntropyDriven(2.0),
                               fg.SamplerConfig(method="dpmpp2m", guidance_interval=(910, 990)), num_classes=4)  # fmt: skip
    with pytest.raises(ValueError, match=r"guidance_interval \(910, 990\) contains none of the chain's timesteps"):
        sampler.sample([0], seeds=[0])
    x = _x_T(1)
    with pytest.raises(ValueError, match="use sample\\(\\) or steps\\(\\)"):
        sampler.step(x, torch.tensor([9]), torch.tensor([0]), None)



def test_labels_are_checked_at_the_first_classifier_call_also_when_earlier_steps_have_none(nets):
    """guidance_interval=(0, 500): the first steps do not call the classifier; the first that does checks the
    labels against its logits (the classifier here declares no number of classes)."""
    unet, clf = nets
    anonymous = lambda x, t: clf(x, t)  # noqa: E731 - no out_channels: the labels are checked on its logits
    for compile_ in (False, True):
        sampler = fg.GuidedSampler(unet, anonymous, _schedule(), fg.EntropyDriven(2.0),
                                   fg.SamplerConfig(method="dpmpp2m", guidance_interval=(0, 500), compile=compile_))  # fmt: skip
        assert sampler.guidance_plan()[:4] == ["off"] * 4
        with pytest.raises(ValueError, match="class id 7 is out of range for the classifier's 4 classes"):
            sampler.sample([1, 7], seeds=[0, 1])


def test_guidance_schedule_options_without_a_classifier_are_refused(nets):
    unet, _ = nets
    for config in (dict(guidance_every=2), dict(guidance_interval=(0, 500))):
        with pytest.raises(ValueError, match="need a classifier and a policy"):
            fg.GuidedSampler(unet, None, _schedule(), None, fg.SamplerConfig(method="unipc", **config))


def test_gradient_maps_show_the_guidance_each_step_applied():
    """guidance_every=2 with an interval: a reusing step's map is the last call's s·∇ (from that step's x_t),
    a step without guidance has a zero map, and a calling step's map is its own fresh s·∇."""
    import numpy as np

    from fastguide.generate import generate, load_networks, make_sampler
    from fastguide.guidance import classifier_gradient

    cpu = torch.device("cpu")
    sampler = make_sampler(load_networks("cond", "ect", cpu), fg.EntropyDriven(3.0), "unipc", "6", guidance_every=2,
                           guidance_interval=(200, 999))  # fmt: skip
    assert sampler.guidance_plan() == ["call", "reuse", "call", "reuse", "call", "off"]
    gen = generate(sampler, [3, 5], [0, 1], 2, cpu, progress=False, grad_map_steps=[2, 3, 5], grad_map_samples=2)
    assert np.array_equal(gen.grad_maps[3], gen.grad_maps[2]) and np.abs(gen.grad_maps[2]).max() > 0
    assert not gen.grad_maps[5].any()
    assert not np.array_equal(gen.x_maps[3], gen.x_maps[2])  # each map keeps its own step's x_t
    x2 = torch.from_numpy(gen.x_maps[2])
    t2 = sampler.schedule.model_timesteps(torch.full((2,), 6 - 1 - 2))
    fresh = classifier_gradient(sampler.classifier, x2, t2, torch.tensor([3, 5])).grad
    np.testing.assert_array_equal(gen.grad_maps[2], (torch.from_numpy(gen.scale[2])[:, None, None, None] * fresh).numpy())
