"""Classifier guidance: the gradient ∇x log p(y|x_t), the predictive entropy, and guidance-scale policies.

A policy maps what the classifier said at one step (:class:`GuidanceState`) to a per-sample scale
``s`` (B,). The sampler multiplies the raw gradient by ``s``; no gradient flows through ``s``.

Policies shipped (the paper's Sect. 3.2 and 4.3, supplement Sect. 1):

* :class:`NoGuidance`: the classifier is not called.
* :class:`Constant`: ``s = scale`` (ADM's ``--classifier_scale``).
* :class:`EntropyDriven` (EDS, Eq. 10): ``s = γ · log K / H(p(ỹ|x_t))`` per sample.
* :class:`ConstantRange`: ``s = c`` for original ``t ≤ t_max`` (700), ``base`` above (supplement Eq. 1).
* :class:`TimestepAware`: ``s = c · (T − t)`` (supplement Eq. 2).
* :class:`GradientNorm`: ``s = c`` when ``‖∇‖₂ < threshold``, ``base`` otherwise. The paper's text
  rescales *weak* gradients; its Eq. 13 and supplement Eq. 3 are written the other way round. We
  follow the text (a weak gradient is the vanishing guidance the method exists to recover).

Any callable ``policy(state) -> (B,) scale`` can be passed instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from . import ops
from .entropy import DEFAULT_ENTROPY_FLOOR, eds_scale, entropy_from_log_probs  # noqa: F401 (the public names)



class ClassifierOutput(NamedTuple):
    """What one classifier call gives the guidance step (B samples, K classes)."""

    logits: torch.Tensor  # (B, K) as returned by the classifier, detached
    log_prob: torch.Tensor  # (B,) float32 log p(y|x_t) of the target class
    entropy: torch.Tensor  # (B,) float32 H(p(ỹ|x_t)) in nats
    grad: torch.Tensor  # (B, C, H, W) ∇x log p(y|x_t), unscaled


class GuidanceState(NamedTuple):
    """What a policy may look at to choose the scale at one step."""

    t: torch.Tensor  # (B,) original timesteps (0..T-1)
    num_timesteps: int  # T of the original schedule
    num_classes: int  # K
    entropy: torch.Tensor  # (B,) float32 entropy in nats
    grad_norm: torch.Tensor  # (B,) float32 ‖∇x log p(y|x_t)‖₂ per sample
    log_prob: torch.Tensor  # (B,) float32 log p(y|x_t)


class GuidancePolicy(Protocol):
    def __call__(self, state: GuidanceState) -> torch.Tensor: ...


def check_class_ids(y: torch.Tensor, num_classes: int, whose: str = "") -> None:
    """Raise ValueError naming the first class id in ``y`` outside [0, num_classes), and its position."""
    bad = ((y < 0) | (y >= num_classes)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise ValueError(f"class id {int(y[i])} at position {i} is out of range for {whose} {num_classes} classes")


def classifier_gradient(
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
) -> ClassifierOutput:
    """Run the classifier on x_t and differentiate log p(y|x_t) with respect to x_t.

    Args:
        classifier: ``(x, t) -> (B, K)`` logits of a noise-aware classifier.
        x: (B, C, H, W) current noisy images.
        t: (B,) timesteps the classifier expects (original, possibly rescaled).
        y: (B,) target classes.
    Returns:
        :class:`ClassifierOutput`; the gradient is that of Σ_i log_softmax(logits)[i, y_i], as ADM's cond_fn.
    """
    # works inside torch.no_grad() and torch.inference_mode() too (an inference tensor is copied out)
    with torch.inference_mode(False), torch.enable_grad():
        x, t, y = (v.clone() if v.is_inference() else v for v in (x, t, y))
        x_in = x.detach().requires_grad_(True)
        logits = classifier(x_in, t)
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"classifier returned shape {tuple(logits.shape)}; expected ({x.shape[0]}, K)")
        check_class_ids(y, logits.shape[1], "the classifier's")
        fused = ops.softmax_entropy_scale(logits.detach(), y)
        # seeding the backward with d log p(y)/d logits = onehot − p is the gradient of Σ log p(y_i)
        (grad,) = torch.autograd.grad(logits, x_in, grad_outputs=fused.dlogits.to(logits.dtype))
    return ClassifierOutput(logits.detach(), fused.log_prob, fused.entropy, grad)


def guidance_state(out: ClassifierOutput, t: torch.Tensor, num_timesteps: int) -> GuidanceState:
    """Summarise a classifier call for a policy: entropy, gradient norm, log p(y), original t."""
    grad_norm = out.grad.float().flatten(1).norm(dim=1)
    return GuidanceState(t, num_timesteps, out.logits.shape[-1], out.entropy, grad_norm, out.log_prob)


def _full(state: GuidanceState, value: float) -> torch.Tensor:
    return torch.full_like(state.entropy, float(value))


FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # scales are float32 tensors


def _check_finite(name: str, value: float) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not (
            math.isfinite(value) and abs(value) <= FLOAT32_MAX):  # fmt: skip
        raise ValueError(f"{name} must be a finite float32 number (|{name}| <= {FLOAT32_MAX:.4g}), got {value!r}")


def _check_strength(name: str, value: float) -> None:
    """A guidance strength: finite and >= 0. A negative one would push samples away from the class
    they are labelled with (and saved as)."""
    _check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (a negative scale guides away from the target class), got {value!r}")


@dataclass(frozen=True)
class NoGuidance:
    """No classifier guidance: the classifier is never called and samples are unguided."""

    def __call__(self, state: GuidanceState) -> torch.Tensor:
        return _full(state, 0.0)


@dataclass(frozen=True)
class Constant:
    """ADM's guidance: the same scale for every sample and step (``--classifier_scale``)."""

    scale: float = 1.0  # the constant s

    def __post_init__(self):
        _check_strength("scale", self.scale)

    def __call__(self, state: GuidanceState) -> torch.Tensor:
        return _full(state, self.scale)


@dataclass(frozen=True)
class EntropyDriven:
    """EDS (Eq. 10): ``s = γ · H(U) / H(p(ỹ|x_t)) = γ · log K / H`` per sample.

    ``H`` is floored at ``entropy_floor`` nats so that a (numerically) one-hot prediction gives a
    large finite scale instead of inf/NaN (the paper's release has no floor). ``max_scale`` optionally
    caps ``s``.
    """

    gamma: float = 1.0  # γ, the balance between guidance and entropy rescaling
    entropy_floor: float = DEFAULT_ENTROPY_FLOOR  # lower bound on H in nats
    max_scale: float | None = None  # optional upper bound on s

    def __post_init__(self):
        _check_strength("gamma", self.gamma)
        if not (self.entropy_floor > 0 and math.isfinite(self.entropy_floor)):
            raise ValueError(f"entropy_floor must be a positive number, got {self.entropy_floor!r}")
        if self.max_scale is not None and not self.max_scale > 0:
            raise ValueError(f"max_scale must be positive, got {self.max_scale!r}")

    def __call__(self, state: GuidanceState) -> torch.Tensor:
        return eds_scale(state.entropy, state.num_classes, self.gamma, self.entropy_floor, self.max_scale)


@dataclass(frozen=True)
class ConstantRange:
    """The paper's "Constant (range 0-700)": ``s = c`` where original ``t ≤ t_max``, ``base`` above."""

    c: float = 1.0  # the recovery factor applied late in sampling
    t_max: int = 700  # last original timestep (inclusive) that gets c
    base: float = 1.0  # the scale for t > t_max

    def __post_init__(self):
        _check_strength("c", self.c)
        _check_strength("base", self.base)

    def __call__(self, state: GuidanceState) -> torch.Tensor:
        late = state.t.to(state.entropy.device) <= self.t_max
        return torch.where(late, _full(state, self.c), _full(state, self.base))


@dataclass(frozen=True)
class TimestepAware:
    """The paper's "Timestep-aware" policy: ``s = c · (T − t)`` with T the original number of steps."""

    c: float = 1.0  # the constant C

    def __post_init__(self):
        _check_strength("c", self.c)

    def __call__(self, state: GuidanceState) -> torch.Tensor:
        remaining = (state.num_timesteps - state.t.to(state.entropy.device)).float()
        return self.c * remaining


@dataclass(frozen=True)
class GradientNorm:
    """The paper's "Gradient Norm" policy: ``s = c`` when ``‖∇‖₂ < threshold`` (weak), else ``base``.

    Follows the paper's text, not its Eq. 13 (which rescales strong gradients); see the module doc.
    """

    c: float = 1.0  # the recovery factor for weak gradients
    threshold: float = 0.2  # the norm bound M
    base: float = 1.0  # the scale for gradients at or above M

    def __post_init__(self):
        _check_strength("c", self.c)
        _check_strength("base", self.base)
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold!r}")

    def __call__(self, state: GuidanceState) -> torch.Tensor:
        weak = state.grad_norm < self.threshold
        return torch.where(weak, _full(state, self.c), _full(state, self.base))


POLICIES = {
    "none": NoGuidance,
    "constant": Constant,
    "eds": EntropyDriven,
    "constant-range": ConstantRange,
    "timestep-aware": TimestepAware,
    "gradient-norm": GradientNorm,
}
