"""float64 oracles of the fused updates with their rounding-error bounds, shared by the kernel tests
of every backend.

The fastguide.diffusion pieces evaluated on :class:`error_bounds.Bounded` inputs: the value is the
formula in float64, the bound is how far a float32 evaluation of it (then stored in x's dtype) can be
from that value (guided_ddpm_step itself casts the guided mean to float32 as ADM does, so the DDPM
oracle spells the step out).
"""

from __future__ import annotations

from error_bounds import Bounded, assert_within_bound

from fastguide.diffusion import denoised_xstart, guided_ddim_step, model_variance, posterior_mean
from fastguide.kernels.reference import COEF, VARIANCE_CODES
from fastguide.schedule import StepCoefficients

VARIANCE_NAMES = {code: name for name, code in VARIANCE_CODES.items()}
OUTPUTS = ("x_prev", "pred_xstart")

# The columns of `coefs` each update reads (a kernel that reads one of them 1e-5 off must fail check_update)
_SHARED = ["sqrt_recip_alpha_bar", "sqrt_recipm1_alpha_bar", "posterior_mean_coef1", "posterior_mean_coef2"]
DDPM_READS = {
    "learned_range": _SHARED + ["log_beta", "posterior_log_variance_clipped"],
    "learned": _SHARED,
    "fixed_small": _SHARED + ["posterior_variance", "posterior_log_variance_clipped"],
    "fixed_large": _SHARED + ["fixed_large_variance", "fixed_large_log_variance"],
}
DDIM_READS = ["alpha_bar", "alpha_bar_prev", "sqrt_recip_alpha_bar", "sqrt_recipm1_alpha_bar"]


def off_by(coefs, column: str, rel: float = 1e-5):
    """``coefs`` with the column ``column`` off by the relative ``rel``: a kernel with a wrong coefficient."""
    coefs = coefs.clone()
    coefs[:, COEF[column]] *= 1 + rel
    return coefs


def _coefficients(coefs) -> StepCoefficients:
    return StepCoefficients(*(Bounded.lift(c) for c in StepCoefficients.of(coefs.detach().cpu())))


def _per_sample(t) -> Bounded:
    return Bounded.lift(t.reshape(-1, 1, 1, 1))


def _guidance(grad, scale) -> Bounded | None:
    return None if grad is None else Bounded.lift(grad) * _per_sample(scale)


def ddpm_exact(x, eps, v, grad, scale, noise, coefs, nonzero, variance, clip_denoised) -> tuple[Bounded, Bounded]:
    """(x_prev, pred_xstart) of ``guided_ddpm_update`` in float64, with float32 error bounds."""
    c = _coefficients(coefs)
    x_, eps_, noise_ = Bounded.lift(x), Bounded.lift(eps), Bounded.lift(noise)
    var, log_var = model_variance(VARIANCE_NAMES[variance], c, None if v is None else Bounded.lift(v))
    xstart = denoised_xstart(x_, eps_, c, clip_denoised)
    mean = posterior_mean(xstart, x_, c)
    guidance = _guidance(grad, scale)
    if guidance is not None:
        mean = mean + var * guidance
    x_prev = mean + _per_sample(nonzero) * (0.5 * log_var).exp() * noise_
    return x_prev.to_dtype(x.dtype), xstart.to_dtype(x.dtype)


def ddim_exact(x, eps, grad, scale, noise, coefs, nonzero, eta, clip_denoised, paper_form) -> tuple[Bounded, Bounded]:
    """(x_prev, pred_xstart) of ``guided_ddim_update``: fastguide.diffusion.guided_ddim_step on Bounded."""
    out = guided_ddim_step(
        Bounded.lift(x), Bounded.lift(eps), _guidance(grad, scale), None if noise is None else Bounded.lift(noise),
        _per_sample(nonzero), _coefficients(coefs), eta, clip_denoised, "paper" if paper_form else "adm",
    )  # fmt: skip
    return out.x_prev.to_dtype(x.dtype), out.pred_xstart.to_dtype(x.dtype)


def check_update(got, exact: tuple[Bounded, Bounded], dtype=None) -> dict[str, float]:
    """Each output (x_prev, pred_xstart) within the float32 rounding-error bound of the formula, in every
    entry; returns the worst ratio of each. The bound does not depend on the CPU, its vector width or
    thread count, or FMA contraction (see error_bounds)."""
    ratios = {}
    for name, g, e in zip(OUTPUTS, got, exact):
        assert g.shape == e.value.shape, (name, tuple(g.shape))
        if dtype is not None:
            assert g.dtype == dtype, (name, g.dtype)
        ratios[name] = assert_within_bound(name, g, e)
    return ratios
