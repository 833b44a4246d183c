"""float64 oracles of the fused updates, shared by the kernel tests of every backend.

The fastguide.diffusion pieces evaluated on float64 tensors (guided_ddpm_step itself casts the
guided mean to float32 as ADM does, so the DDPM oracle spells the step out).
"""

import torch

from fastguide.diffusion import denoised_xstart, guided_ddim_step, model_variance, posterior_mean
from fastguide.kernels.reference import VARIANCE_CODES, unpack_coefficients

VARIANCE_NAMES = {code: name for name, code in VARIANCE_CODES.items()}


def ddpm_f64(x, eps, v, grad, scale, noise, coefs, nonzero, variance, clip_denoised):
    """float64 oracle: the fastguide.diffusion pieces on float64 tensors (guided_ddpm_step casts to float32)."""
    x, eps, noise = x.double(), eps.double(), noise.double()
    c = unpack_coefficients(coefs.double())
    var, log_var = model_variance(VARIANCE_NAMES[variance], c, None if v is None else v.double())
    xstart = denoised_xstart(x, eps, c, clip_denoised)
    mean = posterior_mean(xstart, x, c)
    if grad is not None:
        mean = mean + var * (grad.double() * scale.double().view(-1, 1, 1, 1))
    return mean + nonzero.double().view(-1, 1, 1, 1) * torch.exp(0.5 * log_var) * noise, xstart


def ddim_f64(x, eps, grad, scale, noise, coefs, nonzero, eta, clip_denoised, paper_form):
    """float64 oracle: fastguide.diffusion.guided_ddim_step on float64 tensors."""
    c = unpack_coefficients(coefs.double())
    guidance = None if grad is None else grad.double() * scale.double().view(-1, 1, 1, 1)
    out = guided_ddim_step(
        x.double(), eps.double(), guidance, None if noise is None else noise.double(),
        nonzero.double().view(-1, 1, 1, 1), c, eta, clip_denoised, "paper" if paper_form else "adm",
    )  # fmt: skip
    return out.x_prev, out.pred_xstart
