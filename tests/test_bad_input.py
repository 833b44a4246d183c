"""Bad input is refused loudly: a ValueError naming the bad value, raised before any network runs;
NaN/inf from a network or a policy is a FloatingPointError naming the step and the sample.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import fastguide as fg

C, S, K = 3, 8, 5  # channels, image size, classes


class CountingEps(nn.Module):
    """Eps-model that declares its input (3x8x8) and counts its calls; ``nan_from_t`` poisons sample 1."""

    def __init__(self, num_classes=None, out_channels=C, nan_from_t=None):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = C, S, num_classes
        self.out_channels, self.nan_from_t = out_channels, nan_from_t
        self.calls = 0

    def forward(self, x, t, y=None):
        self.calls += 1
        eps = torch.tanh(x[:, :1]).expand(-1, self.out_channels, -1, -1).clone()
        if self.nan_from_t is not None and t[1] <= self.nan_from_t:
            eps[1, 0, 2, 3] = math.nan
        return eps


class CountingClassifier(nn.Module):
    """Classifier ``(x, t) -> (B, K)`` that counts its calls; ``nan_sample`` gets NaN logits."""

    def __init__(self, num_logits=K, nan_sample=None, declare_k=True):
        super().__init__()
        if declare_k:
            self.out_channels = K
        self.num_logits, self.nan_sample = num_logits, nan_sample
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        logits = x.flatten(1)[:, : self.num_logits] * 2.0
        if self.nan_sample is not None:
            logits = logits.clone()
            logits[self.nan_sample, 1] = math.nan
        return logits


def make(model=None, clf="counting", policy=None, config=None, **kw) -> fg.GuidedSampler:
    """A ddim5 sampler over counting networks; ``kw`` goes to GuidedSampler, ``config`` to SamplerConfig."""
    model = CountingEps() if model is None else model
    clf = CountingClassifier() if clf == "counting" else clf
    policy = fg.Constant(1.0) if policy is None else policy
    schedule = fg.Schedule.create("linear", 1000, "ddim5")
    return fg.GuidedSampler(model, clf, schedule, policy, fg.SamplerConfig(**(config or {})), **kw)


def assert_no_network_call(s: fg.GuidedSampler) -> None:
    assert s.model.calls == 0
    if s.classifier is not None:
        assert s.classifier.calls == 0


# ---- labels ----


@pytest.mark.parametrize(
    "labels, match",
    [
        ([0, K], rf"class id {K}\b"),
        ([0, 99], r"class id 99\b"),
        ([-1, 0], r"class id -1\b"),
        ([0.0, 1.5], r"1\.5"),
        (torch.tensor([0.0, 1.0]), r"tensor\(\[0\., 1\.\]\)"),
    ],
    ids=["k", "far", "negative", "float-list", "float-tensor"],
)
def test_bad_class_ids_are_rejected_before_any_network_call(labels, match):
    s = make()
    with pytest.raises(ValueError, match=match):
        s.sample(labels, seeds=[0, 1])
    assert_no_network_call(s)


def test_class_id_range_from_num_classes_argument():
    s = make(num_classes=K, clf=CountingClassifier(declare_k=False))
    with pytest.raises(ValueError, match=rf"class id {K}\b"):
        s.sample([1, K], seeds=[0, 1])
    assert_no_network_call(s)


def test_class_id_range_from_class_conditional_model_without_classifier():
    s = make(model=CountingEps(num_classes=K), clf=None, policy=fg.NoGuidance())
    with pytest.raises(ValueError, match=rf"class id {K}\b"):
        s.sample([1, K], seeds=[0, 1])
    assert s.model.calls == 0


def test_class_id_out_of_range_for_the_classifier_logits_is_a_value_error():
    """K is declared nowhere, so the check can only come from the logits; it must still be a ValueError."""
    s = make(clf=CountingClassifier(declare_k=False))
    with pytest.raises(ValueError, match=r"\b7\b"):
        s.sample([0, 7], seeds=[0, 1])


@pytest.mark.parametrize("labels", [[], torch.tensor([], dtype=torch.long)], ids=["list", "tensor"])
def test_empty_labels_are_rejected_before_any_network_call(labels):
    s = make()
    with pytest.raises(ValueError, match=r"empty|\[\]"):
        s.sample(labels, seeds=[])
    assert_no_network_call(s)


def test_label_count_must_match_seed_count():
    s = make()
    with pytest.raises(ValueError, match=r"^got 3 labels but 2 seeds: give one per label$"):
        s.sample([0, 1, 2], seeds=[0, 1])
    assert_no_network_call(s)


def test_label_count_must_match_noise_batch():
    s = make()
    with pytest.raises(ValueError, match=r"^got 1 labels but 2 noise rows: give one per label$"):
        s.sample([0], noise=fg.FixedNoise(torch.zeros(2, C, S, S)))
    assert_no_network_call(s)


# ---- seeds and noise ----


@pytest.mark.parametrize("seeds, match", [([0, -1], r"seed -1\b"), ([0, 1.5], r"seed 1\.5"), ([2**63, 0], str(2**63))])
def test_bad_seeds_are_rejected_before_any_network_call(seeds, match):
    s = make()
    with pytest.raises(ValueError, match=match):
        s.sample([0, 1], seeds=seeds)
    assert_no_network_call(s)


def test_seeds_and_noise_are_exclusive_and_one_is_required():
    s = make()
    with pytest.raises(ValueError, match="exactly one"):
        s.sample([0, 1])
    with pytest.raises(ValueError, match="exactly one"):
        s.sample([0, 1], seeds=[0, 1], noise=fg.FixedNoise(torch.zeros(2, C, S, S)))
    assert_no_network_call(s)


@pytest.mark.parametrize("shape", [(2, 1, S, S), (2, C, 16, 16), (2, C, S, 4)], ids=["channels", "size", "width"])
def test_noise_of_the_wrong_image_shape_is_rejected_before_any_network_call(shape):
    s = make()
    with pytest.raises(ValueError, match=re.escape(str(shape[1:]))):
        s.sample([0, 1], noise=fg.FixedNoise(torch.zeros(shape)))
    assert_no_network_call(s)


@pytest.mark.parametrize("image_shape", [(C, S), (0, S, S), (C, S, S, 1)])
def test_malformed_image_shape_is_rejected(image_shape):
    with pytest.raises(ValueError, match=re.escape(str(image_shape))):
        make(image_shape=image_shape)


def test_image_shape_that_contradicts_the_models_channels_is_rejected_before_any_network_call():
    """The model declares in_channels=3; sampling 1-channel images can only fail inside a network."""
    model, clf = CountingEps(), CountingClassifier()
    with pytest.raises(Exception) as exc:
        make(model, clf, image_shape=(1, S, S)).sample([0, 1], seeds=[0, 1])
    assert model.calls == clf.calls == 0, f"{exc.type.__name__} after a network call: {exc.value}"
    assert exc.type is ValueError and "(1, 8, 8)" in str(exc.value)


def test_unknown_image_shape_is_rejected_before_any_network_call():
    model = CountingEps()
    del model.in_channels
    s = make(model=model)
    with pytest.raises(ValueError, match="image_shape"):
        s.sample([0, 1], seeds=[0, 1])
    assert_no_network_call(s)


def test_ddpm_with_fixed_noise_needs_enough_step_noise():
    x = torch.zeros(2, C, S, S)
    s = make(config=dict(method="ddpm"))
    with pytest.raises(ValueError, match="per-step noise"):
        s.sample([0, 1], noise=fg.FixedNoise(x))
    with pytest.raises(ValueError, match=r"3 steps.*5"):
        s.sample([0, 1], noise=fg.FixedNoise(x, torch.zeros(3, *x.shape)))
    assert_no_network_call(s)


# ---- schedules ----


@pytest.mark.parametrize(
    "respacing, match",
    [("0", r"\b0 steps"), ("ddim0", r"'ddim0'"), ("1001", r"1001"), ("ddim600", r"'ddim600'"),
     ("fast", r"'fast'"), ("ddimX", r"'ddimX'"), ("10,0", r"'10,0'")],
)  # fmt: skip
def test_impossible_or_unknown_respacing_is_rejected(respacing, match):
    with pytest.raises(ValueError, match=match):
        fg.Schedule.create("linear", 1000, respacing)


def test_unknown_noise_schedule_is_rejected():
    with pytest.raises(ValueError, match="'quadratic'"):
        fg.Schedule.create("quadratic", 1000, "ddim5")


# ---- configuration ----


@pytest.mark.parametrize(
    "field, value, match",
    [("method", "euler", "'euler'"), ("eta", -1.0, "-1"), ("eta", math.nan, "nan"),
     ("variance", "huge", "'huge'"), ("ddim_guidance", "other", "'other'")],
)  # fmt: skip
def test_bad_sampler_config_values_are_rejected(field, value, match):
    with pytest.raises(ValueError, match=match):
        fg.SamplerConfig(**{field: value})


def test_guidance_policy_without_classifier_is_rejected():
    with pytest.raises(ValueError, match="classifier"):
        fg.GuidedSampler(CountingEps(), None, fg.Schedule.create("linear", 1000, "ddim5"), fg.Constant(2.0))


@pytest.mark.parametrize(
    "make_policy, match",
    [(lambda: fg.EntropyDriven(entropy_floor=0), r"entropy_floor.*\b0\b"), (lambda: fg.Constant(math.nan), "nan"),
     (lambda: fg.EntropyDriven(gamma=math.inf), "inf"), (lambda: fg.GradientNorm(threshold=-1.0), "-1"),
     (lambda: fg.EntropyDriven(gamma=-1), r"gamma must be >= 0 .*got -1"),
     (lambda: fg.Constant(-0.5), r"scale must be >= 0 .*got -0.5"),
     (lambda: fg.ConstantRange(c=-2.0), r"c must be >= 0 .*got -2.0"),
     (lambda: fg.ConstantRange(base=-1.0), r"base must be >= 0 .*got -1.0"),
     (lambda: fg.TimestepAware(c=-0.01), r"c must be >= 0 .*got -0.01"),
     (lambda: fg.GradientNorm(c=-3.0), r"c must be >= 0 .*got -3.0")],
    ids=["eds-floor-0", "constant-nan", "eds-gamma-inf", "gradnorm-negative-threshold", "eds-negative-gamma",
         "constant-negative", "range-negative-c", "range-negative-base", "timestep-negative", "gradnorm-negative"],
)  # fmt: skip
def test_bad_policy_parameters_are_rejected(make_policy, match):
    with pytest.raises(ValueError, match=match):
        make_policy()


# ---- what the networks and the policy return ----


def test_nan_from_eps_model_names_step_and_sample():
    """ddim5 walks t = 800, 600, 400, 200, 0: t = 400 is step 2. The loop has no host syncs, so the
    fault is read after it: all 5 steps run, and the first fault is the one named."""
    s = make(model=CountingEps(nan_from_t=400))
    with pytest.raises(FloatingPointError, match=r"^eps-model output is nan for sample 1 at step 2 \(t=400\)$"):
        s.sample([0, 1], seeds=[0, 1])
    assert s.model.calls == 5


def test_nan_logits_from_classifier_name_the_sample():
    s = make(clf=CountingClassifier(nan_sample=1), policy=fg.EntropyDriven())
    with pytest.raises(FloatingPointError, match=r"classifier.*nan.*sample 1 at step 0"):
        s.sample([0, 1], seeds=[0, 1])


class MinusInfClassifier(CountingClassifier):
    """Gives sample 1 a logit of −inf for every class: p(y|x_t) is undefined."""

    def forward(self, x, t):
        logits = super().forward(x, t).clone()
        logits[1] = -math.inf
        return logits


@pytest.mark.parametrize(
    "policy, check_finite",
    # a scale that depends on p (EDS) fails even unchecked; a constant one only where logits are checked
    [(fg.EntropyDriven(), True), (fg.EntropyDriven(), False), (fg.Constant(1.0), True)],
    ids=["eds", "eds-unchecked", "constant"],
)
def test_all_minus_inf_logits_name_the_classifier(policy, check_finite):
    s = make(clf=MinusInfClassifier(), policy=policy, config=dict(check_finite=check_finite))
    with pytest.raises(FloatingPointError, match=r"^classifier logits are -inf for every class for sample 1 at step 0"):
        s.sample([0, 1], seeds=[0, 1])


def test_minus_inf_for_some_classes_is_allowed():
    class SomeMinusInf(CountingClassifier):
        def forward(self, x, t):
            logits = super().forward(x, t).clone()
            logits[:, :2] = -math.inf
            return logits

    result = make(clf=SomeMinusInf(), policy=fg.EntropyDriven()).sample([0, 3], seeds=[0, 1])
    assert torch.isfinite(result.images).all()  # sample 0's own class has p = 0: log p = -inf, the gradient is finite
    assert result.trace.p_target[:, 0].eq(0).all() and result.trace.p_target[:, 1].gt(0).all()


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_guidance_scale_from_policy_is_rejected(bad):
    s = make(policy=lambda st: torch.tensor([1.0, bad]))
    with pytest.raises(FloatingPointError, match=rf"scale.*{bad}.*sample 1"):
        s.sample([0, 1], seeds=[0, 1])


def test_policy_scale_of_the_wrong_shape_is_rejected():
    s = make(policy=lambda st: torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"shape \(\)"):
        s.sample([0, 1], seeds=[0, 1])


def test_eps_model_with_wrong_channel_count_is_rejected():
    s = make(model=CountingEps(out_channels=5))
    with pytest.raises(ValueError, match=re.escape("(2, 5, 8, 8)")):
        s.sample([0, 1], seeds=[0, 1])


def test_classifier_with_wrong_class_count_is_rejected():
    s = make(clf=CountingClassifier(num_logits=4))
    with pytest.raises(ValueError, match=r"4 logits.*expected 5"):
        s.sample([0, 1], seeds=[0, 1])


def test_learned_variance_needs_a_model_with_2c_outputs():
    s = make(config=dict(method="ddpm", variance="learned_range"))
    with pytest.raises(ValueError, match="'learned_range'"):
        s.sample([0, 1], seeds=[0, 1])


# ---- images and losses ----


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_to_uint8_refuses_non_finite_pixels(bad):
    images = torch.zeros(3, C, S, S)
    images[1, 2, 0, 0] = bad
    with pytest.raises(FloatingPointError, match="sample 1"):
        fg.to_uint8(images)


@pytest.mark.parametrize("label", [K, -1])
def test_ect_loss_rejects_out_of_range_labels(label):
    with pytest.raises(ValueError, match=rf"class id {label}\b"):
        fg.ect_loss(torch.zeros(2, K), torch.tensor([0, label]), eta=0.2)


def test_numpy_and_torch_integer_seeds_are_accepted_and_equal_python_ints():
    import numpy as np

    a = fg.PerSampleNoise(np.arange(2), (3, 4, 4)).initial()
    b = fg.PerSampleNoise(torch.tensor([0, 1]), (3, 4, 4)).initial()
    c = fg.PerSampleNoise([0, 1], (3, 4, 4)).initial()
    assert torch.equal(a, c) and torch.equal(b, c)


def test_ect_loss_rejects_float_labels():
    with pytest.raises(ValueError, match="float32"):
        fg.ect_loss(torch.zeros(2, 3), torch.tensor([0.0, 1.0]), 0.2)


def test_eds_scale_carries_no_gradient():
    entropy = torch.tensor([1.0, 2.0], requires_grad=True)
    assert not fg.eds_scale(entropy, 10, 2.0).requires_grad


def test_zero_diffusion_steps_is_rejected():
    with pytest.raises(ValueError, match="diffusion_steps must be >= 1, got 0"):
        fg.Schedule.create("linear", 0, "")


def test_ddim_eta_above_one_is_rejected():
    with pytest.raises(ValueError, match="eta must be in \\[0, 1\\], got 1.5"):
        fg.SamplerConfig(method="ddim", eta=1.5)


def test_nan_in_supplied_noise_is_rejected_before_sampling():
    x = torch.zeros(2, C, S, S)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x_T holds NaN"):
        fg.FixedNoise(x)
    steps = torch.zeros(3, 2, C, S, S)
    steps[2, 0, 1, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="step noise holds NaN or inf"):
        fg.FixedNoise(torch.zeros(2, C, S, S), steps)


def test_policy_and_config_of_the_wrong_kind_are_rejected_at_construction():
    model, clf = CountingEps(), CountingClassifier()
    with pytest.raises(TypeError, match="'eds'"):
        fg.GuidedSampler(model, clf, fg.Schedule.create("linear", 1000, "ddim5"), "eds")
    with pytest.raises(TypeError, match="dict"):
        fg.GuidedSampler(model, clf, fg.Schedule.create("linear", 1000, "ddim5"), config={"method": "ddim"})
    assert model.calls == clf.calls == 0


def test_seeds_that_are_not_a_sequence_are_rejected():
    model, clf = CountingEps(), CountingClassifier()
    s = fg.GuidedSampler(model, clf, fg.Schedule.create("linear", 1000, "ddim5"), fg.Constant(1.0))
    with pytest.raises(ValueError, match="got 3"):
        s.sample([0, 1, 2], seeds=3)
    assert model.calls == clf.calls == 0


def test_integer_respacing_is_a_step_count():
    assert fg.Schedule.create("linear", 1000, 250).timestep_map == fg.Schedule.create("linear", 1000, "250").timestep_map
