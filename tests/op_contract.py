"""The contracts of the fused ops, as test bases that every backend runs through.

:class:`UpdateOpContract` holds the tests of the two updates; a backend's test module subclasses it
(``TestXxx``) and names its two ops, its device and its dtypes (diffusers' ``SchedulerCommonTest`` does this
for schedulers). Inputs come from one builder (:func:`update_inputs`), and every result is judged by one
rule: each entry within the float32 rounding-error bound of the formula, against float64
(``update_oracle.check_update``).

:class:`EntropyOpContract` does the same for ``softmax_entropy_scale``, judged by the bound of
``error_bounds.softmax_entropy_bound``. The torch reference (test_losses_and_reference.py) and the Triton
kernel (test_kernels_triton.py) run it; the extension does not implement the op and refuses it
(test_ext.py records that).
"""

from __future__ import annotations

import math

import pytest
import torch

from error_bounds import assert_within_bound, error_ratio, softmax_entropy_bound
from update_oracle import DDIM_READS, DDPM_READS, VARIANCE_NAMES, check_update, ddim_exact, ddpm_exact, off_by

import fastguide as fg
from fastguide import ops
from fastguide.kernels.reference import VARIANCE_CODES, softmax_entropy_scale_ref

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


# ---------------------------------------------------------------- softmax–entropy–scale

# K = 1 (the one-class edge case); odd; ImageNet's 1000; more classes than one Triton block of 4096
ENTROPY_SHAPES = [(1, 1), (9, 41), (3, 1000), (2, 70000)]
INF = math.inf


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class EntropyOpContract:
    """Tests of ``softmax_entropy_scale`` (its contract: fastguide.kernels.reference); a subclass sets
    :attr:`op` (a staticmethod with the op's signature), :attr:`backend` (its name in fastguide.ops),
    :attr:`device`, :attr:`dtypes` and :attr:`block_k`.

    Every result is judged by :meth:`check`: each output float32, shaped as the reference's, within the
    float32 rounding-error bound of the formula at those logits against float64, and close to the torch
    reference, which is held to the same bound."""

    op = None
    backend = "torch"
    device = "cpu"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    block_k: int | None = None  # classes per block of an online softmax (the bound counts its rescales); None: one pass

    def randn(self, *shape, seed=0, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=_gen(seed)).to(self.device, dtype)

    def labels(self, values) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.long).to(self.device)

    def check(self, logits, y, gamma=1.0, entropy_floor=1e-6, max_scale=0.0):
        """The op and the eager reference both within the float32 rounding-error bound of the formula (against
        float64, error_bounds), and close to each other; returns the op's output."""
        out = self.op(logits, y, gamma, entropy_floor, max_scale)
        ref = softmax_entropy_scale_ref(logits, y, gamma, entropy_floor, max_scale)
        K = logits.shape[1]
        blocks = 1 if self.block_k is None else max(1, -(-K // self.block_k))
        exact = softmax_entropy_bound(logits, y, gamma, entropy_floor, max_scale, blocks)
        for name, k, e, x in zip(ref._fields, out, ref, exact):
            assert k.dtype == torch.float32 and k.shape == e.shape, name
            torch.testing.assert_close(k, e, equal_nan=True, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
            assert_within_bound(f"reference {name}", e, x)
            assert_within_bound(name, k, x)
        return out

    @pytest.mark.parametrize("shape", ENTROPY_SHAPES, ids=str)
    def test_values_are_within_the_rounding_bound_of_float64(self, shape):
        """log p(y), H, γ·log K / max(H, floor) (capped where max_scale is given) and onehot(y) − p."""
        B, K = shape
        for dtype in self.dtypes:
            logits = (self.randn(B, K, seed=K) * 4).to(dtype)
            y = torch.randint(0, K, (B,), generator=_gen(B)).to(self.device)
            self.check(logits, y, gamma=2.5, max_scale=20.0 if K > 41 else 0.0)

    def test_outputs_are_float32_per_row_and_per_class_on_the_inputs_device(self):
        """log p(y), H and the scale (B,), dlogits (B, K), all float32 whatever the logits' dtype, also for an
        empty batch."""
        for dtype in self.dtypes:
            for B, K in ((0, 5), (1, 1), (4, 3)):
                logits = self.randn(B, K, dtype=dtype)
                out = self.op(logits, self.labels([k % K for k in range(B)]), 1.0, 1e-6, 0.0)
                assert [tuple(t.shape) for t in out] == [(B,), (B,), (B,), (B, K)], (dtype, B, K)
                assert all(t.dtype == torch.float32 and t.device == logits.device for t in out), (dtype, B, K)

    def test_other_layouts_give_the_dense_result(self):
        """Transposed, sliced and stride-0 logits, strided and int32 labels: within the bound, and bit for bit
        the result of the same values laid out densely."""
        for dtype in self.dtypes:
            base = self.randn(41, 9, seed=4, dtype=dtype) * 3
            labels = torch.arange(18, device=self.device) % 41
            views = {
                "transposed": base.t(),  # strides (1, 9)
                "column slice": base.t()[:, ::2],
                "row expand": base[:, 0].reshape(1, 41).expand(9, 41),  # stride 0 over rows
                "class expand": base[0].reshape(9, 1).expand(9, 1000),  # stride 0 over classes: uniform rows
            }
            for name, logits in views.items():
                y = labels[::2] if name != "class expand" else labels[::2].int() * 20  # strided int64, or int32
                assert not logits.is_contiguous()
                out = self.check(logits, y, gamma=1.5)
                contiguous = self.op(logits.contiguous(), y.contiguous(), 1.5, 1e-6, 0.0)
                for a, b in zip(out, contiguous):
                    torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
            uniform = self.op(views["class expand"], labels[:9], 1.0, 1e-6, 0.0)
            torch.testing.assert_close(uniform.entropy, torch.full((9,), math.log(1000), device=self.device))
            torch.testing.assert_close(uniform.scale, torch.ones(9, device=self.device))

    def test_extreme_logits(self):
        """A confident row (H under the floor), uniform rows (H = log K, scale γ), logits of ±1e4 and ±65504,
        classes with logit −inf (p = 0, nothing added to H) and a row with one finite class (H = 0)."""
        big = torch.finfo(torch.float16).max  # 65504 (bf16 rounds it to 65536)
        rows = [
            [40.0, 0.0, 0.0, 0.0, 0.0],  # p(y) = 1 − 4e-18: H ~ 1e-15, floored
            [0.0, 0.0, 0.0, 0.0, 0.0],  # uniform
            [-1e4, -1e4, -1e4, -1e4, -1e4],  # uniform at a large magnitude
            [1e4, -1e4, 0.0, 1e4, -1e4],  # two classes tie, the rest underflow: H = log 2
            [big, -big, 0.0, big, 1.0],
            [-INF, 0.0, 1.0, -INF, 2.0],  # the label's class has p = 0: log p(y) = −inf
            [-INF, -INF, -INF, 3.0, -INF],  # one finite class: p = 1, H = 0
        ]
        y = self.labels([0, 1, 2, 3, 4, 0, 3])
        gamma, log_k = 2.0, math.log(5)
        for dtype in self.dtypes:
            logits = torch.tensor(rows).to(self.device, dtype)
            for floor, cap in ((1e-6, 0.0), (1e-3, 50.0)):
                out = self.check(logits, y, gamma, floor, cap)
                lp, h, s, d = (t.cpu() for t in out)
                assert lp[5].item() == -INF and lp[6].item() == 0.0 and h[6].item() == 0.0
                assert d[5, 0].item() == 1.0 and d[5, 3].item() == 0.0  # onehot − p where p = 0
                assert torch.isfinite(h).all() and torch.isfinite(d).all() and torch.isfinite(lp[:5]).all()
                torch.testing.assert_close(h[[1, 2]], torch.full((2,), log_k))
                torch.testing.assert_close(s[[1, 2]], torch.full((2,), gamma))
                torch.testing.assert_close(h[[3, 4]], torch.full((2,), math.log(2)))
                assert h[0].item() < floor, dtype
                if cap > 0:  # floored, then capped: the cap exactly
                    assert s[0].item() == s[6].item() == cap, dtype
                else:
                    torch.testing.assert_close(s[[0, 6]], torch.full((2,), gamma * log_k / floor))

    def test_one_class_and_two_classes(self):
        """K = 1: p = 1, so log p(y) = H = dlogits = 0 and the scale γ·log 1 / floor = 0, exactly, whatever the
        logit. K = 2: within the bound, a uniform row's scale is γ, and swapping the two classes (and the
        label) swaps log p and dlogits and keeps H and the scale, bit for bit."""
        for dtype in self.dtypes:
            one = (self.randn(6, 1, seed=1) * 1e3).to(dtype)
            out = self.check(one, self.labels([0] * 6), gamma=3.0)
            for t in out:
                assert (t == 0).all(), t
            two = torch.cat([self.randn(6, 2, seed=2) * 4, torch.tensor([[0.0, 0.0], [7.5, -7.5]], device=self.device)])
            two, y = two.to(dtype), self.labels([0, 1, 1, 0, 1, 0, 0, 1])
            out = self.check(two, y, gamma=3.0)
            torch.testing.assert_close(out.scale[6].cpu(), torch.tensor(3.0))  # the uniform row: H = log 2
            swapped = self.check(two.flip(1), 1 - y, gamma=3.0)
            for a, b in zip((out.entropy, out.scale, out.log_prob, out.dlogits),
                            (swapped.entropy, swapped.scale, swapped.log_prob, swapped.dlogits.flip(1))):  # fmt: skip
                assert torch.equal(a, b), dtype

    @pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")  # Triton's interpreter
    def test_each_row_is_computed_alone(self):
        """A row's outputs do not depend on the other rows: the batch gives each row's result alone, in any
        order, bit for bit, also when another row holds NaN, ±inf or huge logits."""
        for dtype in self.dtypes:
            logits = (self.randn(7, 1000, seed=1) * 3).to(dtype)
            y = torch.randint(0, 1000, (7,), generator=_gen(2)).to(self.device)
            batch = self.op(logits, y, 2.0, 1e-6, 10.0)
            for b in range(7):
                alone = self.op(logits[b : b + 1], y[b : b + 1], 2.0, 1e-6, 10.0)
                for a, c in zip(batch, alone):
                    torch.testing.assert_close(a[b : b + 1], c, rtol=0, atol=0)
            order = torch.tensor([3, 0, 6, 1, 5, 2, 4], device=self.device)
            for a, c in zip(batch, self.op(logits[order], y[order], 2.0, 1e-6, 10.0)):
                torch.testing.assert_close(a[order], c, rtol=0, atol=0)
            odd = logits.clone()
            odd[2], odd[4, ::3], odd[5] = math.nan, -INF, 6e4
            odd[4, 7] = INF
            others = [0, 1, 3, 6]
            for a, c in zip(batch, self.op(odd, y, 2.0, 1e-6, 10.0)):
                torch.testing.assert_close(a[others], c[others], rtol=0, atol=0)

    @pytest.mark.parametrize("nan_at", [0, 17, 40])  # first class, a middle one, the last
    def test_a_nan_logit_makes_its_row_nan_and_only_its_row(self, nan_at):
        for dtype in self.dtypes:
            logits = self.randn(4, 41, seed=5) * 3
            logits[1, 3] = 50.0  # the row's max is elsewhere: a NaN-dropping max would hide the NaN
            logits[1, nan_at] = math.nan
            out = self.check(logits.to(dtype), self.labels([0, 1, 2, 3]))
            for field in out:
                assert field[1].isnan().all() and not field[[0, 2, 3]].isnan().any()

    def test_the_scale_is_floored_and_capped(self):
        """H under entropy_floor counts as the floor; max_scale caps the scale exactly and max_scale <= 0 is no
        cap; where the cap does not bind, the scale is the uncapped one bit for bit."""
        logits = self.randn(8, 10, seed=6) * torch.tensor([0.0, 0.5, 1, 2, 4, 8, 16, 64], device=self.device)[:, None]
        y = self.labels(range(8))
        gamma, floor = 3.0, 0.05
        for dtype in self.dtypes:
            z = logits.to(dtype)
            free = self.check(z, y, gamma, floor, 0.0).scale.cpu()
            assert torch.equal(self.check(z, y, gamma, floor, -1.0).scale.cpu(), free)
            h = self.op(z, y, gamma, floor, 0.0).entropy.cpu()
            low = h < floor
            assert low.any() and (~low).any()
            torch.testing.assert_close(free[low], torch.full((int(low.sum()),), gamma * math.log(10) / floor))
            cap = free.median().item()
            capped = self.check(z, y, gamma, floor, cap).scale.cpu()
            binds = free > cap
            assert binds.any() and (~binds).any()
            assert (capped[binds] == cap).all() and torch.equal(capped[~binds], free[~binds])

    def test_bad_shapes_are_errors_naming_them(self):
        cases = [
            ((5,), (5,), r"expected logits \(B, K\) and labels \(B,\), got \(5,\) and \(5,\)"),
            ((2, 5), (3,), r"got \(2, 5\) and \(3,\)"),
            ((2, 5, 1), (2,), r"got \(2, 5, 1\) and \(2,\)"),
            ((2, 5), (2, 1), r"got \(2, 5\) and \(2, 1\)"),
        ]
        for logits, y, match in cases:
            with pytest.raises(ValueError, match=match):
                self.op(torch.zeros(logits, device=self.device), torch.zeros(y, dtype=torch.long, device=self.device),
                        1.0, 1e-6, 0.0)  # fmt: skip

    def test_traces_as_one_graph_without_a_host_sync(self):
        """No value goes to the host: the op traces as one graph (torch.compile with fullgraph fails on
        ``.item()``, ``.tolist()`` or a branch on a tensor) that gives the eager result bit for bit, and on
        CUDA it runs with every synchronisation made an error."""
        logits, y = self.randn(5, 41, seed=7) * 3, self.labels([0, 40, 3, 3, 9])
        eager = self.op(logits, y, 2.0, 1e-3, 10.0)
        compiled = torch.compile(self.op, fullgraph=True, backend="aot_eager")(logits, y, 2.0, 1e-3, 10.0)
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        if logits.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                self.op(logits, y, 2.0, 1e-3, 10.0)
            finally:
                torch.cuda.set_sync_debug_mode("default")

    def test_dispatch_serves_the_op_on_this_backend(self):
        """With the backend forced, fastguide.ops.softmax_entropy_scale runs this op (the same result, bit
        for bit), and ops.explain gives no reason against it."""
        logits, y = self.randn(3, 7, seed=8), self.labels([6, 0, 2])
        with ops.use_backend(self.backend):
            assert dict(ops.explain("softmax_entropy_scale", logits, y))[self.backend] is None
            assert ops.choose("softmax_entropy_scale", logits, y) == self.backend
            got = ops.softmax_entropy_scale(logits, y, 2.0, 1e-6, 5.0)
        for a, b in zip(got, self.op(logits, y, 2.0, 1e-6, 5.0)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    def test_the_rule_fails_an_op_with_logits_1e_5_off_or_gamma_1e_4_off(self):
        """Logits scaled by 1 + 1e-5 (a temperature 84 float32 ulps of 1 off): every output is out of the bound.
        γ 1e-4 off: the scale is, and the other outputs are not."""
        logits, y = self.randn(9, 41, seed=41) * 4, torch.randint(0, 41, (9,), generator=_gen(9)).to(self.device)
        exact = softmax_entropy_bound(logits, y, 2.5)
        hot = self.op(logits * (1 + 1e-5), y, 2.5, 1e-6, 0.0)
        for name, got, x in zip(hot._fields, hot, exact):
            assert error_ratio(name, got, x) > 1, name
        off = self.op(logits, y, 2.5 * (1 + 1e-4), 1e-6, 0.0)
        for name, got, x in zip(off._fields, off, exact):
            if name == "scale":
                with pytest.raises(AssertionError, match="rounding-error bound"):
                    assert_within_bound(name, got, x)
            else:
                assert_within_bound(name, got, x)
