"""Pure-torch references of the fused ops (the oracles for the kernels)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class SoftmaxEntropy(NamedTuple):
    log_prob: torch.Tensor  # (B,) float32 log p(y)
    entropy: torch.Tensor  # (B,) float32 H(p) in nats
    dlogits: torch.Tensor  # (B, K) float32 d log p(y) / d logits = onehot(y) − p


def softmax_entropy_ref(logits: torch.Tensor, y: torch.Tensor) -> SoftmaxEntropy:
    """From logits (B, K) and labels (B,): log p(y), H(p) and onehot(y) − p, all in float32.

    ``onehot(y) − p`` is the gradient of log p(y) with respect to the logits, which seeds the
    classifier's backward pass. Classes with p = 0 contribute 0 to H; NaN logits give NaN.
    """
    if logits.dim() != 2 or y.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (B, K) and labels (B,), got {tuple(logits.shape)} and {tuple(y.shape)}")
    lp = torch.log_softmax(logits.float(), dim=-1)
    p = lp.exp()
    plogp = torch.where(lp == -math.inf, torch.zeros_like(lp), p * lp)
    rows = torch.arange(len(y), device=y.device)
    dlogits = -p
    dlogits[rows, y] += 1
    return SoftmaxEntropy(lp[rows, y], -plogp.sum(dim=-1), dlogits)
