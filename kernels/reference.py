"""Pure-torch references of the fused ops: the runtime fallback and the test oracle of every backend.

The ops and their contracts (every backend implements exactly these):

``softmax_entropy_scale(logits (B,K), y (B,), gamma, entropy_floor, max_scale)``
    -> SoftmaxEntropy(log_prob (B,), entropy (B,), scale (B,), dlogits (B,K)), all float32, computed
    in float32 whatever the logits' dtype (fp32/fp16/bf16). ``dlogits = onehot(y) − softmax`` is
    d log p(y) / d logits, the seed of the classifier's backward pass. ``scale`` is EDS's
    ``gamma · log K / max(H, entropy_floor)`` capped at ``max_scale`` (``max_scale <= 0``: no cap).
    Classes with logit −inf have p = 0 and add 0 to H. A NaN logit makes its row NaN.

``guided_ddpm_update(x, eps, v, grad, scale, noise, coefs, nonzero, variance, clip_denoised)``
    -> (x_prev, pred_xstart), both like x. The DDPM step of :func:`fastguide.diffusion.guided_ddpm_step`
    with g = scale[b] · grad and σ² from :func:`fastguide.diffusion.model_variance`.

``guided_ddim_update(x, eps, grad, scale, noise, coefs, nonzero, eta, clip_denoised, paper_form)``
    -> (x_prev, pred_xstart). The DDIM step of :func:`fastguide.diffusion.guided_ddim_step`.

Shared conventions of the two updates:

* x, eps, noise, grad: (B, C, H, W), float32 (fp16/bf16 accepted and computed in float32, results in
  x's dtype); v: like x or None (only for the learned variances); grad and scale are both given or
  both None (unguided); noise may be None for DDIM with eta = 0.
* ``coefs``: (B, NUM_COEFS) float32, one row per sample (:meth:`fastguide.Schedule.coefficients`), the
  columns of :class:`fastguide.schedule.StepCoefficients` in ``COEF_FIELDS`` order, so every sample may
  sit at its own timestep. ``nonzero``: (B,) float32, 0 where t = 0.
* ``variance``: an int code from ``VARIANCE_CODES``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastguide.diffusion import guided_ddim_step, guided_ddpm_step, model_variance
from fastguide.entropy import eds_scale, entropy_from_log_probs
from fastguide.schedule import StepCoefficients

COEF_FIELDS = StepCoefficients._fields
NUM_COEFS = len(COEF_FIELDS)
COEF = {name: i for i, name in enumerate(COEF_FIELDS)}  # column index of each coefficient
VARIANCE_CODES = {"learned_range": 0, "learned": 1, "fixed_small": 2, "fixed_large": 3}


class SoftmaxEntropy(NamedTuple):
    log_prob: torch.Tensor  # (B,) float32 log p(y)
    entropy: torch.Tensor  # (B,) float32 H(p) in nats
    scale: torch.Tensor  # (B,) float32 EDS scale γ·log K / max(H, floor), capped
    dlogits: torch.Tensor  # (B, K) float32 d log p(y) / d logits = onehot(y) − p


def softmax_entropy_scale_ref(
    logits: torch.Tensor, y: torch.Tensor, gamma: float = 1.0, entropy_floor: float = 1e-6, max_scale: float = 0.0
) -> SoftmaxEntropy:
    """Reference of ``softmax_entropy_scale`` (see the module doc)."""
    if logits.dim() != 2 or y.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (B, K) and labels (B,), got {tuple(logits.shape)} and {tuple(y.shape)}")
    lp = torch.log_softmax(logits.float(), dim=-1)
    entropy = entropy_from_log_probs(lp)
    rows = torch.arange(len(y), device=y.device)
    onehot = torch.zeros_like(lp)
    onehot[rows, y] = 1.0
    # onehot − p through log-softmax's own backward, so the result is bitwise what autograd gives ADM
    dlogits = torch.ops.aten._log_softmax_backward_data(onehot, lp, 1, torch.float32)
    scale = eds_scale(entropy, logits.shape[1], gamma, entropy_floor, max_scale if max_scale > 0 else None)
    return SoftmaxEntropy(lp[rows, y], entropy, scale, dlogits)


def _guidance(grad: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor | None:
    if (grad is None) != (scale is None):
        raise ValueError("grad and scale must both be given (guided) or both be None (unguided)")
    return None if grad is None else grad.float() * scale.float().view(-1, 1, 1, 1)


def guided_ddpm_update_ref(
    x: torch.Tensor,
    eps: torch.Tensor,
    v: torch.Tensor | None,
    grad: torch.Tensor | None,
    scale: torch.Tensor | None,
    noise: torch.Tensor,
    coefs: torch.Tensor,
    nonzero: torch.Tensor,
    variance: int,
    clip_denoised: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``guided_ddpm_update`` (see the module doc)."""
    c = StepCoefficients.of(coefs.float())
    name = next(k for k, code in VARIANCE_CODES.items() if code == variance)
    var, log_var = model_variance(name, c, None if v is None else v.float())
    out = guided_ddpm_step(
        x.float(), eps.float(), var, log_var, _guidance(grad, scale), noise.float(),
        nonzero.float().view(-1, 1, 1, 1), c, clip_denoised,
    )  # fmt: skip
    return out.x_prev.to(x.dtype), out.pred_xstart.to(x.dtype)


def guided_ddim_update_ref(
    x: torch.Tensor,
    eps: torch.Tensor,
    grad: torch.Tensor | None,
    scale: torch.Tensor | None,
    noise: torch.Tensor | None,
    coefs: torch.Tensor,
    nonzero: torch.Tensor,
    eta: float,
    clip_denoised: bool,
    paper_form: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``guided_ddim_update`` (see the module doc)."""
    c = StepCoefficients.of(coefs.float())
    out = guided_ddim_step(
        x.float(), eps.float(), _guidance(grad, scale), None if noise is None else noise.float(),
        nonzero.float().view(-1, 1, 1, 1), c, eta, clip_denoised, "paper" if paper_form else "adm",
    )  # fmt: skip
    return out.x_prev.to(x.dtype), out.pred_xstart.to(x.dtype)
