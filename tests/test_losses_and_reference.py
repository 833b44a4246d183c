"""ECT loss (Eq. 11-12), the entropy helper, the softmax-entropy reference op and to_uint8."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastguide as fg
from fastguide.kernels import softmax_entropy_scale_ref
from fastguide.kernels.reference import guided_ddim_update_ref, guided_ddpm_update_ref
from op_contract import EntropyOpContract, UpdateOpContract


def _logits(b=6, k=9, seed=0):
    return torch.randn(b, k, generator=torch.Generator().manual_seed(seed)) * 3


def test_ect_with_eta_zero_is_cross_entropy():
    logits, y = _logits(), torch.tensor([0, 8, 3, 3, 1, 5])
    torch.testing.assert_close(fg.ect_loss(logits, y, 0.0), F.cross_entropy(logits, y))


def test_ect_matches_the_definition_in_float64():
    logits, y = _logits(seed=1), torch.tensor([1, 2, 3, 4, 5, 6])
    p = logits.double().softmax(-1)
    ce = -p.log()[torch.arange(6), y]
    h = -(p * p.log()).sum(-1)
    expected = (ce + 0.2 * (math.log(9) - h)).mean()
    torch.testing.assert_close(fg.ect_loss(logits, y, 0.2).double(), expected, rtol=1e-6, atol=1e-6)


def test_ect_penalty_vanishes_for_uniform_predictions_and_grows_with_confidence():
    y = torch.tensor([0, 1])
    uniform = torch.zeros(2, 4)
    assert fg.ect_loss(uniform, y, 1.0).item() == pytest.approx(math.log(4))
    confident = torch.tensor([[9.0, 0, 0, 0], [0, 9.0, 0, 0]])
    assert fg.ect_loss(confident, y, 1.0) > fg.ect_loss(confident, y, 0.0)


def test_ect_computes_in_float32_for_half_inputs():
    logits, y = _logits(), torch.tensor([0, 1, 2, 3, 4, 5])
    loss = fg.ect_loss(logits.half(), y, 0.2)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, fg.ect_loss(logits.half().float(), y, 0.2))


def test_entropy_handles_zero_probability_and_propagates_nan():
    lp = torch.log_softmax(torch.tensor([[0.0, -math.inf, 0.0], [1.0, float("nan"), 0.0]]), dim=-1)
    h = fg.entropy_from_log_probs(lp)
    assert h[0].item() == pytest.approx(math.log(2))
    assert math.isnan(h[1].item())


def test_softmax_entropy_ref_matches_autograd():
    logits, y = _logits(4, 7, seed=2).requires_grad_(True), torch.tensor([6, 0, 2, 2])
    out = softmax_entropy_scale_ref(logits, y)
    lp = torch.log_softmax(logits, -1)
    (grad,) = torch.autograd.grad(lp[torch.arange(4), y].sum(), logits)
    torch.testing.assert_close(out.dlogits, grad)
    torch.testing.assert_close(out.log_prob, lp[torch.arange(4), y].detach())
    torch.testing.assert_close(out.entropy, fg.entropy_from_log_probs(lp.detach()))


def test_to_uint8_maps_range_and_refuses_nan():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2).expand(2, 3, 2, 2).clone()
    u = fg.to_uint8(x)
    assert u.shape == (2, 2, 2, 3) and u.dtype == torch.uint8
    assert u[0, :, :, 0].flatten().tolist() == [0, 127, 255, 255]
    x[1, 2, 0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="sample 1"):
        fg.to_uint8(x)


class TestTorchReferenceUpdates(UpdateOpContract):
    """The references themselves (the torch backend) through the shared contract: they too must be within
    the rounding bound, which checks the bound as much as the references."""

    ddpm = staticmethod(guided_ddpm_update_ref)
    ddim = staticmethod(guided_ddim_update_ref)


class TestTorchReferenceEntropy(EntropyOpContract):
    """The softmax–entropy–scale reference (the torch backend) through the shared contract, held to the same
    rounding bound as every kernel."""

    op = staticmethod(softmax_entropy_scale_ref)
    backend = "torch"
