"""Training losses: the paper's entropy-constraint objective (ECT) for the classifier, and the diffusion
model's losses with ADM's conventions (L_simple and Improved DDPM's hybrid loss).

Small pure functions over tensors. In the diffusion losses ``t`` is always an index into the chain of a
:class:`fastguide.schedule.Schedule`; training uses a schedule that is not respaced
(``Schedule.create(noise_schedule, diffusion_steps, "")``), where the index is the original timestep.
Schedule values are gathered from float64 tables and cast to float32 once, as ADM's
``_extract_into_tensor``; losses are computed in float32 whatever the model's output dtype.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .diffusion import model_variance, posterior_mean, predict_xstart_from_eps
from .guidance import check_class_ids, entropy_from_log_probs
from .schedule import Schedule, StepCoefficients


class ECTTerms(NamedTuple):
    """Per-sample terms of the ECT objective."""

    ce: torch.Tensor  # (B,) cross-entropy −log p(y|x)
    kl_uniform: torch.Tensor  # (B,) log K − H(p) = KL(p ‖ U), the entropy constraint (Eq. 11)


def ect_terms(logits: torch.Tensor, y: torch.Tensor) -> ECTTerms:
    """Cross-entropy and entropy-constraint terms per sample, in float32 (see :func:`ect_loss`)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, K), got shape {tuple(logits.shape)}")
    if y.shape != logits.shape[:1]:
        raise ValueError(f"labels of shape {tuple(y.shape)} do not match logits of shape {tuple(logits.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got dtype {y.dtype}")
    k = logits.shape[1]
    check_class_ids(y, k, "the logits'")
    log_probs = F.log_softmax(logits.float(), dim=-1)
    ce = F.nll_loss(log_probs, y, reduction="none")
    return ECTTerms(ce, math.log(k) - entropy_from_log_probs(log_probs))


def ect_loss(logits: torch.Tensor, y: torch.Tensor, eta: float) -> torch.Tensor:
    """Entropy-constraint training loss, mean over the batch of ``CE + η · (log K − H(p))`` (Eq. 11–12).

    ``log K − H(p)`` is KL(p ‖ U), the distance of the prediction from the uniform distribution; η = 0
    is plain cross-entropy. Computed in float32 whatever the logits' dtype.

    Args:
        logits: (B, K) classifier logits.
        y: (B,) integer labels in [0, K).
        eta: weight η of the entropy constraint (the paper uses 0.2).
    Returns:
        scalar loss.
    """
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a number >= 0, got {eta!r}")
    terms = ect_terms(logits, y)
    if eta == 0:
        return terms.ce.mean()
    return (terms.ce + eta * terms.kl_uniform).mean()


# ---- the diffusion model's losses ----

LOG2 = math.log(2.0)
BIN_HALF_WIDTH = 1.0 / 255.0  # images in [-1, 1] quantised to 256 levels: bins of width 2/255


class Gaussian(NamedTuple):
    """A diagonal Gaussian given by its mean and log variance, both broadcastable to (B, C, H, W)."""

    mean: torch.Tensor
    log_variance: torch.Tensor


class DiffusionLossTerms(NamedTuple):
    """Per-sample (B,) float32 terms of the diffusion training loss."""

    loss: torch.Tensor  # what to average and minimise: mse, or mse + λ·T·vb with learned sigma
    mse: torch.Tensor  # L_simple: mean over dims of (ε − ε_θ)²
    vb: torch.Tensor | None  # L_t in bits/dim, unscaled (trains only σ); None without learned sigma


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def _gather(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Values of a float64 table at ``t`` (B,), as (B,1,1,1) float32 on t's device."""
    return table[t.detach().to("cpu", torch.long)].to(device=t.device, dtype=torch.float32).view(-1, 1, 1, 1)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) with the given noise.

    Args:
        x0: (B, C, H, W) clean images in [-1, 1].
        t: (B,) int64 chain indices.
        noise: (B, C, H, W) standard normal noise ε.
        schedule: the training schedule.
    Returns:
        (B, C, H, W) x_t.
    """
    alpha_bar = schedule.table("alpha_bar")
    # x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε  (DDPM Eq. 4)
    return _gather(alpha_bar.sqrt(), t) * x0 + _gather((1.0 - alpha_bar).sqrt(), t) * noise


def q_posterior_mean_variance(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> Gaussian:
    """The forward-process posterior q(x_{t-1} | x_t, x_0) (DDPM Eq. 6–7).

    The log variance is ADM's clipped one (log β̃_1 in place of log β̃_0 = −∞).

    Args:
        x0, x_t: (B, C, H, W).
        t: (B,) int64 chain indices.
    Returns:
        Gaussian(mean (B, C, H, W), log_variance (B, 1, 1, 1)).
    """
    c = StepCoefficients.of(schedule.coefficients(t))
    return Gaussian(posterior_mean(x0, x_t, c), c.posterior_log_variance_clipped)


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) in nats; arguments broadcast together."""
    # KL = ½ (−1 + log σ₂² − log σ₁² + σ₁²/σ₂² + (μ₁ − μ₂)²/σ₂²)
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) ≈ ½ (1 + tanh(sqrt(2/π) (x + 0.044715 x³))), the tanh approximation ADM uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-probability (nats) of 8-bit images under a Gaussian discretised to 256 bins.

    Each value in [-1, 1] owns the bin [x − 1/255, x + 1/255]; the lowest and highest bins extend to
    −∞ and +∞ so that the 256 probabilities sum to one (Improved DDPM §2 / DDPM Eq. 13 decoder).
    Probabilities are clamped at 1e-12 before the log.

    Args:
        x: (B, C, H, W) images on the 256-level grid of [-1, 1].
        means: Gaussian means, broadcastable to x.
        log_scales: log standard deviations, broadcastable to x.
    Returns:
        (B, C, H, W) log-likelihoods.
    """
    centred = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + BIN_HALF_WIDTH))
    cdf_min = approx_standard_normal_cdf(inv_std * (centred - BIN_HALF_WIDTH))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # thresholds at ±0.999 pick the open-ended edge bins (x = ±1), as ADM
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_bin))


PREDICTIONS = ("eps", "x0", "v")


def xstart_from_prediction(prediction: str, x_t: torch.Tensor, out: torch.Tensor, c: StepCoefficients) -> torch.Tensor:
    """x̂_0 from a network's ε̂ (ADM's formula), x̂_0 itself, or v̂: x̂_0 = sqrt(ᾱ_t)·x_t − sqrt(1 − ᾱ_t)·v̂."""
    if prediction == "x0":
        return out
    if prediction == "v":
        return c.alpha_bar.sqrt() * x_t - (1 - c.alpha_bar).sqrt() * out
    return predict_xstart_from_eps(x_t, out, c)


def vlb_term(
    model_output_eps_frozen: torch.Tensor,
    var_values: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: Schedule,
    clip_denoised: bool = False,
    prediction: str = "eps",
) -> torch.Tensor:
    """One term L_t of the variational bound, in bits per dimension (Improved DDPM Eq. 4–6).

    For t > 0: KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)); for t = 0: the decoder NLL −log p(x_0|x_1)
    under the discretised Gaussian. Both are averaged over all non-batch dims and divided by log 2.
    The ε that sets p's mean is detached here (ADM's ``frozen_out``), so the term trains only the
    variance, which is the ``learned_range`` interpolation of :func:`fastguide.diffusion.model_variance`.

    Args:
        model_output_eps_frozen: (B, C, H, W) the network's ε̂ (detached inside), or its x̂_0 or v̂ (``prediction``).
        var_values: (B, C, H, W) v ∈ [−1, 1], the second half of the model output.
        x0: (B, C, H, W) clean images in [-1, 1].
        x_t: (B, C, H, W) noised images at t.
        t: (B,) int64 chain indices.
        schedule: the training schedule.
        clip_denoised: clip x̂_0 to [-1, 1] before forming p's mean (ADM's training uses False).
        prediction: what the first argument is: "eps", "x0" (ADM's ``ModelMeanType.START_X``) or "v".
    Returns:
        (B,) float32 L_t in bits/dim.
    """
    c = StepCoefficients.of(schedule.coefficients(t))
    frozen = model_output_eps_frozen.detach().float()
    xstart = xstart_from_prediction(prediction, x_t, frozen, c)
    if clip_denoised:
        xstart = xstart.clamp(-1, 1)
    _, model_log_var = model_variance("learned_range", c, var_values.float())
    model_mean = posterior_mean(xstart, x_t, c)
    true = q_posterior_mean_variance(x0, x_t, t, schedule)
    kl = mean_flat(normal_kl(true.mean, true.log_variance, model_mean, model_log_var)) / LOG2
    # L_0 = −log p(x_0|x_1), with σ = exp(½ log σ²)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / LOG2
    return torch.where(t == 0, nll, kl)


def split_model_output(
    out: torch.Tensor, x0: torch.Tensor, learn_sigma: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split an eps-model's output into (ε, v), v = None without learned sigma.

    Raises:
        ValueError: the output is not (B, C, H, W) (or (B, 2C, H, W) with ``learn_sigma``) for x0 of
            shape (B, C, H, W); the message names both shapes.
    """
    channels = x0.shape[1] * (2 if learn_sigma else 1)
    expected = (x0.shape[0], channels, *x0.shape[2:])
    if tuple(out.shape) != expected:
        kind = "2C (eps and v, learn_sigma=True)" if learn_sigma else "C (eps, learn_sigma=False)"
        raise ValueError(
            f"model output has shape {tuple(out.shape)}; expected {expected}, i.e. {kind} channels "
            f"for input of shape {tuple(x0.shape)}"
        )
    out = out.float()
    if not learn_sigma:
        return out, None
    eps, var_values = out.chunk(2, dim=1)
    return eps, var_values


def diffusion_loss(
    model: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    schedule: Schedule,
    model_kwargs: dict | None = None,
    learn_sigma: bool = False,
    lambda_vlb: float = 0.001,
    prediction: str = "eps",
    v_loss: bool = False,
) -> DiffusionLossTerms:
    """ADM's training loss: L_simple, or Improved DDPM's L_hybrid with learned sigma.

    Noises x0 to x_t (DDPM Eq. 4), runs ``model(x_t, schedule.model_timesteps(t), **model_kwargs)``
    (the network sees original timesteps) and returns

    * mse = mean over dims of (ε − ε_θ)²  (L_simple, DDPM Eq. 14), of (x_0 − x̂_θ)² for an
      x0-prediction network (``prediction="x0"``, ADM's ``ModelMeanType.START_X``), or of (v − v̂_θ)²
      for a v-prediction network (``"v"``, v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x_0; not in ADM);
    * with ``learn_sigma``: loss = mse + λ · T · vb  (L_hybrid = L_simple + λ L_vlb, Improved DDPM §3.1),
      where vb is the one-term estimate L_t of :func:`vlb_term` (trains only σ) and T = schedule.num_steps
      makes T · L_t an unbiased estimate of the whole bound for uniformly sampled t.

    With T = 1000 and λ = 0.001 this is exactly ADM's default (``LossType.MSE``, learned range
    variance, ``vb *= num_timesteps / 1000``): λ · T = T / 1000.

    Args:
        model: ``nn.Module(x_t, t, **kwargs)`` returning (B, C, H, W), or (B, 2C, H, W) with ``learn_sigma``.
        x0: (B, C, H, W) clean images in [-1, 1].
        t: (B,) int64 chain indices (see :func:`sample_timesteps`).
        noise: (B, C, H, W) standard normal noise.
        schedule: the training schedule (not respaced).
        model_kwargs: extra model arguments, e.g. ``{"y": labels}`` for class-conditional models.
        learn_sigma: the model also outputs v for the ``learned_range`` variance.
        lambda_vlb: weight λ of L_vlb in the hybrid loss.
        prediction: what the network's first C channels predict: "eps", "x0" or "v".
        v_loss: measure mse as the error of v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x_0 (Salimans & Ho 2022), whatever
            the network predicts: ‖x_0 − x̂_0‖² / (1 − ᾱ_t), or ‖ε − ε̂‖² / ᾱ_t. Not in ADM. For an x0 network
            it weights small t as an eps-model's loss does and large t as an x0 loss, where plain x0 mse
            leaves small t under-trained (and learned sigmas far outside the learned range).
    Returns:
        DiffusionLossTerms of (B,) float32 tensors; vb is None without learned sigma.
    Raises:
        ValueError: the model output does not have C (or 2C) channels; the message names the shape.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    x_t = q_sample(x0, t, noise, schedule)
    out = model(x_t, schedule.model_timesteps(t), **(model_kwargs or {}))
    eps, var_values = split_model_output(out, x0, learn_sigma)
    if prediction != "eps" or v_loss:  # float64: 1 − ᾱ_0 = β_0 is 1e-4 (an eps-model's plain loss needs no ᾱ)
        alpha_bar = schedule.table("alpha_bar")[t.detach().cpu()]
    if prediction == "v":
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a, b = (c.to(x0.device, torch.float32).reshape(shape) for c in (alpha_bar.sqrt(), (1 - alpha_bar).sqrt()))
        target = a * noise.float() - b * x0.float()
    else:
        target = x0 if prediction == "x0" else noise
    mse = mean_flat((target.float() - eps) ** 2)
    if v_loss and prediction != "v":
        mse = mse * (1 / ((1 - alpha_bar) if prediction == "x0" else alpha_bar)).to(mse.device, mse.dtype)
    if var_values is None:
        return DiffusionLossTerms(mse, mse, None)
    vb = vlb_term(eps, var_values, x0.float(), x_t.float(), t, schedule, prediction=prediction)
    return DiffusionLossTerms(mse + lambda_vlb * schedule.num_steps * vb, mse, vb)


def sample_timesteps(
    batch: int, num_timesteps: int, generator: torch.Generator, device: torch.device | str | None = None
) -> torch.Tensor:
    """Uniform timesteps t ~ U{0, …, T−1} (ADM's UniformSampler; all importance weights are 1).

    Drawn on the generator's device and then moved, so the draws depend only on the generator's state.

    Args:
        batch: number of timesteps B.
        num_timesteps: T.
        generator: the source of randomness.
        device: where the result lives (default: the generator's device).
    Returns:
        (B,) int64 timesteps in [0, T).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    t = torch.randint(0, num_timesteps, (batch,), generator=generator, device=generator.device)
    return t.to(device if device is not None else generator.device)
