"""One classifier pass for every user (the sampler's step, ADM's cond_fn, classifier_gradient), policies that
compute their own scale from it, and the policy registry as the one place a policy is named."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import fastguide as fg
from fastguide.classifier import classifier_pass
from fastguide.generate import build_policy
from nets import K
from nets import tiny_nets as nets


def inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 3, 8, 8, generator=g), torch.tensor([900, 400, 20]), torch.tensor([0, 3, 1])


def test_the_step_cond_fn_and_classifier_gradient_give_the_same_pass():
    """Bit for bit: the sampler's step (its record), ADM's cond_fn and classifier_gradient are one computation."""
    _, clf = nets()
    x, t, y = inputs()
    out = classifier_pass(clf, x, t, y, scale_args=fg.EntropyDriven(2.0).scale_args())
    public = fg.classifier_gradient(clf, x, t, y)
    for name in ("logits", "log_prob", "entropy", "grad"):
        assert torch.equal(getattr(public, name), getattr(out, name)), name
    cond = fg.adm.eds_cond_fn(clf, 2.0)
    assert torch.equal(cond(x, t, y=y), out.grad * out.fused_scale.view(-1, 1, 1, 1))
    assert torch.equal(cond.last.entropy, out.entropy) and torch.equal(cond.last.grad_norm, out.grad_norm)
    # the scale is the fused op's: γ·log K / H, checked against float64
    want = 2.0 * math.log(K) / out.entropy.double()
    torch.testing.assert_close(out.fused_scale.double(), want, rtol=4 * 2**-24, atol=0)


class Doubled(fg.EntropyDriven):
    """A user's variant of EDS with its own formula."""

    def __call__(self, state):
        return 2.0 * super().__call__(state)


class Flat(fg.EntropyDriven):
    """A user's variant that overrides the pass's scale itself."""

    def scale_of(self, out, state):
        return torch.full_like(out.entropy, 0.5)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_subclass_of_eds_that_overrides_its_formula_is_honoured(compile, monkeypatch):
    monkeypatch.setenv("FASTGUIDE_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    unet, clf = nets()

    def run(policy):
        sampler = fg.GuidedSampler(unet, clf, fg.Schedule.create("linear", 1000, "ddim5"), policy,
                                   fg.SamplerConfig(compile=compile))  # fmt: skip
        return sampler.sample([1, 2, 3], seeds=[0, 1, 2]).trace

    base, doubled, flat = run(fg.EntropyDriven(2.0)), run(Doubled(2.0)), run(Flat(2.0))
    # at the first step the inputs are the same, so the scale is twice EDS's (one float32 rounding apart)
    torch.testing.assert_close(doubled.scale[0], 2.0 * base.scale[0], rtol=2**-22, atol=0)
    assert not torch.allclose(doubled.scale[0], base.scale[0])
    assert torch.equal(flat.scale, torch.full_like(flat.scale, 0.5))


def test_a_plain_callable_and_a_bad_shape():
    unet, clf = nets()
    sampler = fg.GuidedSampler(unet, clf, fg.Schedule.create("linear", 1000, "ddim5"), lambda s: 0.25 + 0 * s.entropy)
    trace = sampler.sample([1, 2], seeds=[0, 1]).trace
    assert torch.equal(trace.scale, torch.full_like(trace.scale, 0.25))
    bad = fg.GuidedSampler(unet, clf, fg.Schedule.create("linear", 1000, "ddim5"), lambda s: s.entropy[:1])
    with pytest.raises(ValueError, match=r"policy returned a scale of shape \(1,\); expected \(2,\)"):
        bad.sample([1, 2], seeds=[0, 1])


def test_every_registered_policy_is_known_by_name_everywhere():
    """POLICIES is the one place: the CLI's choices, build_policy's strength and reproduce's sweeps follow it."""
    from fastguide import reproduce
    from fastguide.cli import build_parser

    parser = build_parser()
    sample = next(a for a in parser._subparsers._group_actions[0].choices["sample"]._actions if a.dest == "policy")
    assert set(sample.choices) == set(fg.POLICIES)
    assert reproduce.POLICY_ORDER == tuple(fg.POLICIES)
    for name, cls in fg.POLICIES.items():
        assert cls.name == name
        if cls.strength is None:
            with pytest.raises(ValueError, match="has no effect"):
                build_policy(name, 2.0)
            continue
        assert cls.strength in {f.name for f in dataclasses.fields(cls)}
        assert getattr(build_policy(name, 2.0), cls.strength) == 2.0
        assert reproduce.SWEEPS[name] == cls.sweep and len(cls.sweep) == 3
