"""Backend dispatch of the fused ops: priority, reasons, FASTGUIDE_BACKEND, and the sampler using it."""

import pytest
import torch

import fastguide as fg
import fastguide.adm  # noqa: F401  (fg.adm)
from fastguide import ops
from fastguide.kernels import reference


def _ddim_args(b=2):
    sched = fg.Schedule.create("linear", 1000, "ddim10")
    index = torch.tensor([9, 3])[:b]
    x, eps, grad, noise = (torch.randn(b, 3, 5, 7) for _ in range(4))
    return (x, eps, grad, torch.full((b,), 2.0), noise, sched.coefficients(index), (index != 0).float(), 0.0,
            True, False)  # fmt: skip


def test_unknown_forced_backend_is_named():
    with pytest.raises(ValueError, match="'cuda-magic'"):
        with ops.use_backend("cuda-magic"):
            pass


def test_explain_gives_a_reason_for_every_backend_that_cannot_serve():
    reasons = dict(ops.explain("guided_ddim_update", *_ddim_args()))
    assert list(reasons) == list(ops.PRIORITY)
    assert reasons["torch"] is None
    assert "interpreter" in reasons["triton"]  # CPU tensors: automatic dispatch never picks the interpreter
    entropy = dict(ops.explain("softmax_entropy_scale", torch.zeros(2, 3), torch.tensor([0, 1])))
    assert entropy["ext"] is not None


def test_automatic_choice_follows_priority():
    args = _ddim_args()
    reasons = dict(ops.explain("guided_ddim_update", *args))
    expected = next(name for name in ops.PRIORITY if reasons[name] is None)
    assert ops.choose("guided_ddim_update", *args) == expected


def test_forced_backend_is_used(monkeypatch):
    calls = []
    real = reference.guided_ddim_update_ref
    monkeypatch.setattr(reference, "guided_ddim_update_ref", lambda *a: calls.append(1) or real(*a))
    with ops.use_backend("torch"):
        ops.guided_ddim_update(*_ddim_args())
    assert calls == [1]


def test_forced_backend_that_cannot_serve_lists_why(monkeypatch):
    monkeypatch.setitem(ops._BACKENDS, "ext", (lambda op, t, f: "not built in this test", ops._ext_impl))
    with ops.use_backend("ext"), pytest.raises(ops.BackendUnavailable, match="FASTGUIDE_BACKEND=ext.*not built"):
        ops.guided_ddim_update(*_ddim_args())


def test_environment_variable_forces_the_backend(monkeypatch):
    monkeypatch.setenv(ops.ENV, "torch")
    assert ops.choose("guided_ddim_update", *_ddim_args()) == "torch"
    monkeypatch.setenv(ops.ENV, "nope")
    with pytest.raises(ValueError, match="'nope'"):
        ops.choose("guided_ddim_update", *_ddim_args())


def test_sampler_goes_through_dispatch_and_matches_the_torch_backend():
    torch.manual_seed(0)
    unet = fg.adm.UNetModel(8, 3, 32, 6, 1, (), channel_mult=(1,))
    clf = fg.adm.EncoderUNetModel(8, 3, 32, 4, 1, (), channel_mult=(1,))
    for m in (unet, clf):
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.05)
    for method in ("ddpm", "ddim"):
        s = fg.GuidedSampler(unet.eval(), clf.eval(), fg.Schedule.create("linear", 1000, "ddim5"),
                             fg.EntropyDriven(2.0), fg.SamplerConfig(method=method))  # fmt: skip
        auto = s.sample([1, 3], seeds=[0, 1]).images
        with ops.use_backend("torch"):
            ref = s.sample([1, 3], seeds=[0, 1]).images
        torch.testing.assert_close(auto, ref, rtol=1e-5, atol=1e-5)


def test_sampler_resolves_the_fused_ops_once_and_calls_them_every_step(monkeypatch):
    """Dispatch is decided once per sampler (and device and shape), not at every call of a step."""
    resolved, called = [], []
    real = ops.resolve

    def recording_resolve(op, *args):
        resolved.append(op)
        impl = real(op, *args)
        return lambda *a: called.append(op) or impl(*a)

    monkeypatch.setattr(ops, "resolve", recording_resolve)
    torch.manual_seed(0)
    unet = fg.adm.UNetModel(8, 3, 32, 6, 1, (), channel_mult=(1,)).eval()
    clf = fg.adm.EncoderUNetModel(8, 3, 32, 4, 1, (), channel_mult=(1,)).eval()
    for method in ("ddpm", "ddim"):
        s = fg.GuidedSampler(unet, clf, fg.Schedule.create("linear", 1000, "ddim3"), fg.EntropyDriven(2.0),
                             fg.SamplerConfig(method=method))  # fmt: skip
        s.sample([1], seeds=[0])
        s.sample([2], seeds=[1])  # the same shape: nothing resolved again
    assert resolved == ["guided_ddpm_update", "softmax_entropy_scale", "guided_ddim_update", "softmax_entropy_scale"]
    update = ["softmax_entropy_scale", "guided_ddpm_update"] * 6 + ["softmax_entropy_scale", "guided_ddim_update"] * 6
    assert called == update


def test_per_sample_inputs_in_other_layouts_are_normalised_before_dispatch():
    x, eps, grad, scale, noise, coefs, nonzero, *rest = _ddim_args()
    expected = ops.guided_ddim_update(x, eps, grad, scale, noise, coefs, nonzero, *rest)
    got = ops.guided_ddim_update(x, eps, grad, scale.view(-1, 1, 1, 1).double(), noise, coefs, nonzero.bool(), *rest)
    torch.testing.assert_close(got, expected)
