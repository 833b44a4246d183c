"""Training losses of the paper: the entropy-constraint objective (ECT)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .guidance import check_class_ids, entropy_from_log_probs


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
