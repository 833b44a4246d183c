"""The predictive entropy H(p(y|x_t)) and EDS's scale from it (paper Eq. 10): the math that the fused
``softmax_entropy_scale`` op implements, with no dependency on the rest of the package."""

from __future__ import annotations

import math

import torch

# H(p) never goes below this (nats) when it divides: a confident classifier in float32 can give H = 0
DEFAULT_ENTROPY_FLOOR = 1e-6


def entropy_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ p log p over the last axis, in float32, from log-probabilities.

    Classes with p = 0 (log p = −inf) contribute 0; a NaN anywhere in a row gives NaN.
    """
    lp = log_probs.float()
    plogp = torch.where(lp == -math.inf, torch.zeros_like(lp), lp.exp() * lp)
    return -plogp.sum(dim=-1)


def eds_scale(
    entropy: torch.Tensor,
    num_classes: int,
    gamma: float,
    entropy_floor: float = DEFAULT_ENTROPY_FLOOR,
    max_scale: float | None = None,
) -> torch.Tensor:
    """EDS scale ``γ · log K / max(H, floor)`` (Eq. 10), optionally capped at ``max_scale``. NaN stays NaN."""
    s = gamma * math.log(num_classes) / entropy.detach().clamp_min(entropy_floor)
    return s if max_scale is None else s.clamp_max(max_scale)
