"""The contract of the fused updates, as one test base that every backend runs through.

:class:`UpdateOpContract` holds the tests; a backend's test module subclasses it (``TestXxx``) and names
its two ops, its device and its dtypes (diffusers' ``SchedulerCommonTest`` does this for schedulers).
Inputs come from one builder (:func:`update_inputs`), and every result is judged by one rule: each entry
within the float32 rounding-error bound of the formula, against float64 (``update_oracle.check_update``).
"""

from __future__ import annotations

import math

import pytest
import torch

from update_oracle import DDIM_READS, DDPM_READS, VARIANCE_NAMES, check_update, ddim_exact, ddpm_exact, off_by

import fastguide as fg
from fastguide.kernels.reference import VARIANCE_CODES

SCHEDULE = fg.Schedule.create("linear", 1000, "250")
# per-sample respaced indices: t = 0 (no noise), the noisiest step, and everything between
INDICES = [0, 249, 1, 125, 60, 2, 200, 10, 248]
SHAPES = [(9, 3, 7, 5), (1, 1, 1, 1), (2, 3, 64, 65)]  # odd sizes; the last spans several CPU chunks
LAYOUTS = ["contiguous", "channels_last", "strided", "expanded", "odd"]


def _layout(t: torch.Tensor, layout: str, batch_shared: bool = False) -> torch.Tensor:
    """The same values as t in another memory layout."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a wider tensor
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "expanded" and batch_shared:  # stride 0 along the batch
        return t[:1].expand_as(t)
    return t


def update_inputs(shape=(9, 3, 7, 5), dtype=torch.float32, variance=0, layout="contiguous", seed=0, device="cpu"):
    """x, eps, v, grad, scale, noise, coefs, nonzero for a batch whose samples sit at different timesteps.

    v is in [−1, 1] for learned_range, a log variance in [−9, −3] for learned, None for fixed variances.
    """
    g = torch.Generator().manual_seed(seed)
    batch = shape[0]
    index = torch.tensor([INDICES[i % len(INDICES)] for i in range(batch)])
    coefs, nonzero = SCHEDULE.coefficients(index), (index != 0).float()
    x, eps, grad, noise = (torch.randn(shape, generator=g) for _ in range(4))
    v = torch.empty(shape).uniform_(-9.0, -3.0, generator=g) if variance == 1 else torch.empty(shape).uniform_(
        -1.0, 1.0, generator=g)  # fmt: skip
    scale = torch.empty(batch).uniform_(0.5, 10.0, generator=g)
    x, eps, v = (_layout(t.to(device, dtype), layout) for t in (x, eps, v))
    grad, noise = (_layout(t.to(device, dtype), layout, batch_shared=True) for t in (grad, noise))
    coefs, nonzero, scale = coefs.to(device), nonzero.to(device), scale.to(device)
    if layout == "odd":  # stride 0 inside a sample, column-major coefficients, strided per-sample rows
        grad = grad[:, :, :1, :1].expand_as(grad)
        coefs, scale, nonzero = coefs.t().contiguous().t(), torch.stack([scale, scale], 1)[:, 0], nonzero.repeat(2)[::2]
    return x, eps, v if variance in (0, 1) else None, grad, scale, noise, coefs, nonzero


def _cpu(out):
    return [t.cpu() for t in out]


class UpdateOpContract:
    """Tests of ``guided_ddpm_update`` / ``guided_ddim_update``; a subclass sets :attr:`ddpm`, :attr:`ddim`
    (staticmethods with the ops' signatures), :attr:`device` and :attr:`dtypes`."""

    ddpm = ddim = None
    device = "cpu"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def inputs(self, *args, **kwargs):
        return update_inputs(*args, device=self.device, **kwargs)

    def run_ddpm(self, args: tuple, dtype) -> list[torch.Tensor]:
        got = self.ddpm(*args)
        check_update(_cpu(got), ddpm_exact(*(a.cpu() if torch.is_tensor(a) else a for a in args)), dtype)
        return got

    def run_ddim(self, args: tuple, dtype) -> list[torch.Tensor]:
        got = self.ddim(*args)
        check_update(_cpu(got), ddim_exact(*(a.cpu() if torch.is_tensor(a) else a for a in args)), dtype)
        return got

    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    @pytest.mark.parametrize("guided", [True, False], ids=["guided", "unguided"])
    @pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
    @pytest.mark.parametrize("variance", list(VARIANCE_CODES.values()), ids=list(VARIANCE_CODES))
    def test_ddpm_is_within_the_rounding_bound_of_float64(self, variance, clip, guided, shape):
        for dtype in self.dtypes:
            x, eps, v, grad, scale, noise, coefs, nonzero = self.inputs(shape, dtype, variance)
            if not guided:
                grad = scale = None
            self.run_ddpm((x, eps, v, grad, scale, noise, coefs, nonzero, variance, clip), dtype)

    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    @pytest.mark.parametrize("guided", [True, False], ids=["guided", "unguided"])
    @pytest.mark.parametrize("paper_form", [False, True], ids=["adm", "paper"])
    @pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
    def test_ddim_is_within_the_rounding_bound_of_float64(self, eta, paper_form, guided, shape):
        for dtype in self.dtypes:
            for clip in (True, False):
                x, eps, _, grad, scale, noise, coefs, nonzero = self.inputs(shape, dtype)
                if not guided:
                    grad = scale = None
                noise = None if eta == 0 else noise  # not needed, and allowed to be absent
                self.run_ddim((x, eps, grad, scale, noise, coefs, nonzero, eta, clip, paper_form), dtype)

    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_other_layouts_give_the_dense_result(self, layout):
        """Channels-last, strided, stride-0 and column-major inputs: within the bound, and bit for bit the
        result of the same values laid out densely."""

        def dense(args):
            return [a.contiguous() if torch.is_tensor(a) else a for a in args]

        for variance in VARIANCE_CODES.values():
            args = (*self.inputs((3, 3, 9, 41), torch.float32, variance, layout), variance, True)
            for a, b in zip(self.run_ddpm(args, torch.float32), self.ddpm(*dense(args))):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        x, eps, _, grad, scale, noise, coefs, nonzero = self.inputs((3, 3, 9, 41), torch.float32, layout=layout)
        args = (x, eps, grad, scale, noise, coefs, nonzero, 0.5, True, False)
        for a, b in zip(self.run_ddim(args, torch.float32), self.ddim(*dense(args))):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    def test_samples_at_different_timesteps_equal_each_alone(self):
        code = VARIANCE_CODES["learned_range"]
        x, eps, v, grad, scale, noise, coefs, nonzero = args = self.inputs((3, 3, 7, 5))
        both = (self.ddpm(*args, code, True), self.ddim(x, eps, grad, scale, noise, coefs, nonzero, 0.5, True, False))
        for b in range(3):
            one = [t[b : b + 1] for t in args]
            x1, eps1, v1, grad1, scale1, noise1, coefs1, nonzero1 = one
            alone = (self.ddpm(*one, code, True), self.ddim(x1, eps1, grad1, scale1, noise1, coefs1, nonzero1, 0.5,
                                                           True, False))  # fmt: skip
            for batched, single in zip(both, alone):
                for a, c in zip(batched, single):
                    torch.testing.assert_close(a[b : b + 1], c, rtol=0, atol=0)

    def test_unguided_equals_guided_with_scale_zero(self):
        for dtype in self.dtypes:
            x, eps, v, grad, scale, noise, coefs, nonzero = self.inputs(dtype=dtype)
            zero = torch.zeros_like(scale)
            for variance in VARIANCE_NAMES:
                vv = v if variance in (0, 1) else None
                guided = self.ddpm(x, eps, vv, grad, zero, noise, coefs, nonzero, variance, True)
                unguided = self.ddpm(x, eps, vv, None, None, noise, coefs, nonzero, variance, True)
                for a, b in zip(guided, unguided):  # μ + σ²·0 is μ exactly
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
            for paper_form in (True, False):
                guided = self.ddim(x, eps, grad, zero, noise, coefs, nonzero, 0.5, True, paper_form)
                unguided = self.ddim(x, eps, None, None, noise, coefs, nonzero, 0.5, True, paper_form)
                for a, b in zip(guided, unguided):  # the ε → x̂0 → ε round trip: equal up to rounding
                    torch.testing.assert_close(a, b, **(dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else {}))

    def test_ddim_at_eta_zero_ignores_noise(self):
        x, eps, _, grad, scale, noise, coefs, nonzero = self.inputs()
        with_noise = self.ddim(x, eps, grad, scale, noise, coefs, nonzero, 0.0, True, False)
        without = self.ddim(x, eps, grad, scale, None, coefs, nonzero, 0.0, True, False)
        for a, b in zip(with_noise, without):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    def test_nan_goes_where_the_reference_puts_it(self):
        from fastguide.kernels.reference import guided_ddim_update_ref, guided_ddpm_update_ref

        x, eps, v, grad, scale, noise, coefs, nonzero = self.inputs()
        eps[0, 1, 2, 3] = math.nan  # survives the clamp
        grad[1, 0, 0, 0] = math.nan
        for clip in (True, False):
            for variance in VARIANCE_NAMES:
                call = (x, eps, v if variance in (0, 1) else None, grad, scale, noise, coefs, nonzero, variance, clip)
                for a, b in zip(self.ddpm(*call), guided_ddpm_update_ref(*call)):
                    assert torch.equal(a.isnan(), b.isnan()) and a.isnan().sum() >= 1
            call = (x, eps, grad, scale, noise, coefs, nonzero, 0.5, clip, False)
            for a, b in zip(self.ddim(*call), guided_ddim_update_ref(*call)):
                assert torch.equal(a.isnan(), b.isnan()) and a.isnan().sum() >= 1

    def test_empty_batch(self):
        x, eps, v, grad, scale, noise, coefs, nonzero = self.inputs((0, 3, 4, 4))
        x_prev, x0 = self.ddpm(x, eps, v, grad, scale, noise, coefs, nonzero, 0, True)
        assert x_prev.shape == x0.shape == (0, 3, 4, 4)

    @pytest.mark.parametrize("variance", list(VARIANCE_CODES.values()), ids=list(VARIANCE_CODES))
    def test_the_rule_fails_a_ddpm_op_reading_a_coefficient_1e_5_off(self, variance):
        """Each column the update reads, 1e-5 (about 170 float32 ulps) off: the rule fails. The columns it
        does not read change nothing."""
        args = list(self.inputs((9, 3, 7, 5), torch.float32, variance)) + [variance, False]
        exact, right = ddpm_exact(*_cpu_args(args)), self.ddpm(*args)
        check_update(_cpu(right), exact)
        coefs = args[6]
        for column in fg.schedule.StepCoefficients._fields:
            args[6] = off_by(coefs, column)
            wrong = _cpu(self.ddpm(*args))
            if column in DDPM_READS[VARIANCE_NAMES[variance]]:
                with pytest.raises(AssertionError, match="rounding-error bound|NaN in other places"):
                    check_update(wrong, exact)
            else:
                for a, b in zip(wrong, _cpu(right)):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)

    @pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")  # Triton's interpreter
    @pytest.mark.parametrize("paper_form", [False, True], ids=["adm", "paper"])
    def test_the_rule_fails_a_ddim_op_reading_a_coefficient_1e_5_off(self, paper_form):
        """As for DDPM; ᾱ_{t−1} = 1 (the last step) off by 1e-5 even gives √(negative) = NaN."""
        x, eps, _, grad, scale, noise, coefs, nonzero = self.inputs((9, 3, 7, 5), torch.float32)
        args = [x, eps, grad, scale, noise, coefs, nonzero, 0.5, False, paper_form]
        exact, right = ddim_exact(*_cpu_args(args)), self.ddim(*args)
        check_update(_cpu(right), exact)
        for column in fg.schedule.StepCoefficients._fields:
            args[5] = off_by(coefs, column)
            wrong = _cpu(self.ddim(*args))
            if column in DDIM_READS:
                with pytest.raises(AssertionError, match="rounding-error bound|NaN in other places"):
                    check_update(wrong, exact)
            else:
                for a, b in zip(wrong, _cpu(right)):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _cpu_args(args):
    return [a.cpu() if torch.is_tensor(a) else a for a in args]
