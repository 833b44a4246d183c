"""The formulas of the guided DDPM and DDIM updates, as small pure functions over tensors.

They are the pure-torch reference of the fused updates (:mod:`fastguide.kernels.reference`); the public
update API is :func:`fastguide.guided_ddpm_update` / :func:`fastguide.guided_ddim_update`, which take the
coefficient matrix of :meth:`fastguide.Schedule.coefficients`. Here its columns come as named (B,1,1,1)
float32 views (:meth:`fastguide.schedule.StepCoefficients.of`), so every sample of a batch may sit at its
own timestep. The arithmetic follows ADM's ``GaussianDiffusion`` operation by operation (same order,
float32), which is what makes the golden trajectories agree to float32 rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .schedule import Schedule, StepCoefficients

VARIANCES = ("learned_range", "learned", "fixed_small", "fixed_large")
DDIM_GUIDANCE = ("adm", "paper")


class StepOutput(NamedTuple):
    """Result of one update."""

    x_prev: torch.Tensor  # (B, C, H, W) x_{t-1}
    pred_xstart: torch.Tensor  # (B, C, H, W) the x̂_0 the update used


def predict_xstart_from_eps(x_t: torch.Tensor, eps: torch.Tensor, c: StepCoefficients) -> torch.Tensor:
    """x̂_0 = x_t / sqrt(ᾱ_t) − sqrt(1/ᾱ_t − 1) · ε  (paper Eq. 5)."""
    return c.sqrt_recip_alpha_bar * x_t - c.sqrt_recipm1_alpha_bar * eps


def predict_eps_from_xstart(x_t: torch.Tensor, xstart: torch.Tensor, c: StepCoefficients) -> torch.Tensor:
    """ε = (x_t / sqrt(ᾱ_t) − x̂_0) / sqrt(1/ᾱ_t − 1), the inverse of :func:`predict_xstart_from_eps`."""
    return (c.sqrt_recip_alpha_bar * x_t - xstart) / c.sqrt_recipm1_alpha_bar


class _EpsView(nn.Module):
    """A network that predicts something other than ε, seen as an eps-model: the first C output channels are
    turned into ε by :meth:`_eps` with two float32 coefficients per original timestep (cast once from
    float64), the variance channels pass through, and the network's attributes show through."""

    def __init__(self, net: nn.Module, schedule: Schedule):
        super().__init__()
        self.net = net
        # ᾱ by original timestep; timesteps outside the chain get NaN, which the samplers report as non-finite
        alpha_bar = torch.full((schedule.num_original_timesteps,), math.nan, dtype=torch.float64)
        alpha_bar[torch.tensor(schedule.timestep_map, dtype=torch.long)] = schedule.table("alpha_bar")
        a, b = self._coefficients(alpha_bar)
        self.register_buffer("coef_x", a.float(), persistent=False)
        self.register_buffer("coef_out", b.float(), persistent=False)
        self.rescale = schedule.num_original_timesteps / 1000.0 if schedule.rescale_timesteps else None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("net"), name)  # in_channels, image_size, num_classes, ...

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.net(x, t, **kwargs)
        index = t.long() if self.rescale is None else (t * self.rescale).round().long()
        c = x.shape[1]
        a = self.coef_x[index].reshape(-1, 1, 1, 1)
        b = self.coef_out[index].reshape(-1, 1, 1, 1)
        return torch.cat([self._eps(a, b, x.float(), out[:, :c].float()), out[:, c:].float()], dim=1)


class XStartToEps(_EpsView):
    """An x0-prediction network (ADM's ``--predict_xstart``, ``ModelMeanType.START_X``) seen as an eps-model.

    Its first C output channels x̂_0 become ε = (x_t / sqrt(ᾱ_t) − x̂_0) / sqrt(1/ᾱ_t − 1), ADM's
    ``_predict_eps_from_xstart`` (same operations, coefficients cast once from float64 to float32); the
    variance channels pass through. Every sampler, fused update and ADM loop of fastguide takes ε, and
    recovers x̂_0 = x_t / sqrt(ᾱ_t) − sqrt(1/ᾱ_t − 1) · ε from it: the round trip costs about one float32
    rounding of x_t / sqrt(ᾱ_t), which the update multiplies by sqrt(ᾱ_{t-1}) again.

    Args:
        net: the x0-prediction network ``(x, t, **kw) -> (B, C or 2C, H, W)``.
        schedule: the chain it was trained on (any respacing of it: the tables are read by the original
            timestep ``t`` the network is given, un-rescaled when ``schedule.rescale_timesteps``).
    """

    @staticmethod
    def _coefficients(alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sqrt(1.0 / alpha_bar), torch.sqrt(1.0 / alpha_bar - 1)

    @staticmethod
    def _eps(sqrt_recip: torch.Tensor, sqrt_recipm1: torch.Tensor, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (sqrt_recip * x - x0) / sqrt_recipm1


class VToEps(_EpsView):
    """A v-prediction network (v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x_0, Salimans & Ho 2022; fastguide's
    ``predict_v``, not an ADM option) seen as an eps-model: ε = sqrt(ᾱ_t)·v̂ + sqrt(1 − ᾱ_t)·x_t.

    At small t it predicts ε, at large t −x_0, so neither end asks the network for the identity: an
    eps-model must get sqrt(ᾱ_t)·x_0 right inside ε̂ at large t (or deterministic samplers carry x_T's
    mean into the image), an x0-model must copy x_t at small t. Arguments as :class:`XStartToEps`.
    """

    @staticmethod
    def _coefficients(alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sqrt(1.0 - alpha_bar), torch.sqrt(alpha_bar)

    @staticmethod
    def _eps(sqrt_one_minus: torch.Tensor, sqrt_alpha_bar: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sqrt_alpha_bar * v + sqrt_one_minus * x


def posterior_mean(xstart: torch.Tensor, x_t: torch.Tensor, c: StepCoefficients) -> torch.Tensor:
    """Mean of q(x_{t-1} | x_t, x_0) (DDPM Eq. 7)."""
    return c.posterior_mean_coef1 * xstart + c.posterior_mean_coef2 * x_t


def model_variance(
    variance: str, c: StepCoefficients, var_values: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """σ_t² and log σ_t² of p(x_{t-1}|x_t) for ADM's variance types.

    ``learned_range``: interpolate between log β̃_t and log β_t with v ∈ [−1, 1] (Improved DDPM Eq. 15);
    ``learned``: v is the log variance; ``fixed_small``: β̃_t; ``fixed_large``: β_t (β̃_1 at t = 0).
    For the fixed types both come from float64 tables, so β̃_0 = 0 exactly, as in ADM.
    """
    if variance in ("learned_range", "learned"):
        if var_values is None:
            raise ValueError(f"variance {variance!r} needs a model with 2C output channels (eps and v)")
        if variance == "learned":
            log_var = var_values
        else:
            frac = (var_values + 1) / 2
            log_var = frac * c.log_beta + (1 - frac) * c.posterior_log_variance_clipped
        return torch.exp(log_var), log_var
    if variance == "fixed_small":
        return c.posterior_variance, c.posterior_log_variance_clipped
    if variance == "fixed_large":
        return c.fixed_large_variance, c.fixed_large_log_variance
    raise ValueError(f"unknown variance {variance!r}; expected one of {VARIANCES}")


def denoised_xstart(x_t: torch.Tensor, eps: torch.Tensor, c: StepCoefficients, clip_denoised: bool) -> torch.Tensor:
    """x̂_0 from ε, clipped to [−1, 1] if asked (ADM's process_xstart)."""
    xstart = predict_xstart_from_eps(x_t, eps, c)
    return xstart.clamp(-1, 1) if clip_denoised else xstart


def guided_ddpm_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    var: torch.Tensor,
    log_var: torch.Tensor,
    guidance: torch.Tensor | None,
    noise: torch.Tensor,
    nonzero: torch.Tensor,
    c: StepCoefficients,
    clip_denoised: bool = True,
) -> StepOutput:
    """One ancestral step with classifier guidance (paper Eq. 8, ADM's p_sample + condition_mean).

    Args:
        x_t: (B,C,H,W) current sample.
        eps: (B,C,H,W) predicted noise.
        var, log_var: σ_t² and log σ_t², broadcastable to x_t (see :func:`model_variance`).
        guidance: s · ∇x log p(y|x_t), (B,C,H,W), or None for unguided sampling.
        noise: (B,C,H,W) standard normal noise.
        nonzero: (B,1,1,1) 0 where t = 0 (no noise is added at the last step), else 1.
        c: schedule coefficients at this step.
    Returns:
        x_{t-1} = μ + σ² · g + σ · z, and the x̂_0 used for μ.
    """
    xstart = denoised_xstart(x_t, eps, c, clip_denoised)
    mean = posterior_mean(xstart, x_t, c)
    if guidance is not None:
        mean = mean.float() + var * guidance.float()
    return StepOutput(mean + nonzero * torch.exp(0.5 * log_var) * noise, xstart)


def guided_ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    guidance: torch.Tensor | None,
    noise: torch.Tensor | None,
    nonzero: torch.Tensor,
    c: StepCoefficients,
    eta: float = 0.0,
    clip_denoised: bool = True,
    ddim_guidance: str = "adm",
) -> StepOutput:
    """One DDIM step with classifier guidance (paper Eq. 4 and Alg. 1, ADM's ddim_sample + condition_score).

    ε is re-derived from the (clipped) x̂_0, then shifted by the guidance:
    ``adm`` (default; ADM and the EDS release): ε̂ = ε − sqrt(1 − ᾱ_t) · g;
    ``paper`` (Algorithm 1, line 9): ε̂ = ε − g.
    The guided x̂_0 is not clipped again, as in ADM.

    Args:
        guidance: s · ∇x log p(y|x_t), or None for unguided sampling.
        noise: standard normal noise, used only when eta > 0.
        eta: 0 = deterministic DDIM, 1 = DDPM-like stochasticity.
    """
    if ddim_guidance not in DDIM_GUIDANCE:
        raise ValueError(f"unknown ddim_guidance {ddim_guidance!r}; expected one of {DDIM_GUIDANCE}")
    xstart = denoised_xstart(x_t, eps, c, clip_denoised)
    if guidance is not None:
        eps_hat = predict_eps_from_xstart(x_t, xstart, c)
        weight = (1 - c.alpha_bar).sqrt() if ddim_guidance == "adm" else 1.0
        xstart = predict_xstart_from_eps(x_t, eps_hat - weight * guidance, c)
    eps = predict_eps_from_xstart(x_t, xstart, c)
    sigma = eta * torch.sqrt((1 - c.alpha_bar_prev) / (1 - c.alpha_bar)) * torch.sqrt(1 - c.alpha_bar / c.alpha_bar_prev)
    x_prev = xstart * torch.sqrt(c.alpha_bar_prev) + torch.sqrt(1 - c.alpha_bar_prev - sigma**2) * eps
    if eta > 0:
        x_prev = x_prev + nonzero * sigma * noise
    return StepOutput(x_prev, xstart)
