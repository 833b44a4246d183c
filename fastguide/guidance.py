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

Any callable ``policy(state) -> (B,) scale`` can be passed instead. The shipped policies derive from
:class:`Policy`, which says how a policy turns one classifier pass into its scale (EDS takes the scale the
fused softmax–entropy–scale op computed in the pass, unless a subclass gives its own formula), and
declares the policy's name, the field a strength sets and its sweep: registering a policy is adding its
class to :data:`POLICIES`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol

import torch

from .classifier import NO_SCALE_ARGS, ClassifierPass, classifier_pass
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

    @classmethod
    def of(cls, out: ClassifierPass, t: torch.Tensor, num_timesteps: int) -> GuidanceState:
        """A classifier pass at original timesteps ``t``, for a policy."""
        return cls(t, num_timesteps, out.logits.shape[-1], out.entropy, out.grad_norm, out.log_prob)


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
    with torch.inference_mode(False):
        x, t, y = (v.clone() if v.is_inference() else v for v in (x, t, y))
        out = classifier_pass(classifier, x, t, y, check=lambda k: check_class_ids(y, k, "the classifier's"))
    return ClassifierOutput(out.logits, out.log_prob, out.entropy, out.grad)


class Policy:
    """Base of the shipped guidance policies: a policy is called on a :class:`GuidanceState` and returns the
    (B,) scale; this says how it is applied to one classifier pass, and how the command line knows it."""

    name: ClassVar[str]  # its key in POLICIES (the CLI's --policy)
    strength: ClassVar[str | None] = None  # the field a strength (--scale) sets; None: it takes none
    sweep: ClassVar[tuple[float, ...]] = ()  # the strengths `fastguide reproduce` sweeps (the embedded models)

    def __call__(self, state: GuidanceState) -> torch.Tensor:
        raise NotImplementedError

    def scale_args(self) -> tuple[float, float, float]:
        """The fused op's (γ, entropy floor, max scale): what its scale output computes in the pass."""
        return NO_SCALE_ARGS

    def scale_of(self, out: ClassifierPass, state: GuidanceState) -> torch.Tensor:
        """The (B,) float32 scale of this pass (no gradient flows through it)."""
        return torch.as_tensor(self(state), dtype=torch.float32, device=out.entropy.device).detach()

    def trace_warning(self, trace) -> str | None:
        """A warning about a finished run's :class:`~fastguide.SamplingTrace`, or None."""
        return None


@dataclass(frozen=True)
class CallablePolicy(Policy):
    """A user's ``policy(state) -> (B,) scale`` callable, applied as a :class:`Policy`."""

    fn: Callable[[GuidanceState], torch.Tensor]

    def __call__(self, state: GuidanceState) -> torch.Tensor:
        return self.fn(state)


def as_policy(policy: GuidancePolicy) -> Policy:
    """``policy`` as a :class:`Policy` (a plain callable is wrapped)."""
    return policy if isinstance(policy, Policy) else CallablePolicy(policy)


def policy_scale(policy: Policy, out: ClassifierPass, state: GuidanceState) -> torch.Tensor:
    """The policy's (B,) scale for one pass; ValueError for a scale of another shape."""
    scale = policy.scale_of(out, state)
    if scale.shape != (len(out.entropy),):
        raise ValueError(f"policy returned a scale of shape {tuple(scale.shape)}; expected ({len(out.entropy)},)")
    return scale


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
class NoGuidance(Policy):
    """No classifier guidance: the classifier is never called and samples are unguided."""

    name: ClassVar[str] = "none"

    def __call__(self, state: GuidanceState) -> torch.Tensor:
        return _full(state, 0.0)


@dataclass(frozen=True)
class Constant(Policy):
    """ADM's guidance: the same scale for every sample and step (``--classifier_scale``)."""

    name: ClassVar[str] = "constant"
    strength: ClassVar[str | None] = "scale"
    sweep: ClassVar[tuple[float, ...]] = (3.0, 10.0, 30.0)

    scale: float = 1.0  # the constant s

    def __post_init__(self):
        _check_strength("scale", self.scale)

    def __call__(self, state: GuidanceState) -> torch.Tensor:
        return _full(state, self.scale)


@dataclass(frozen=True)
class EntropyDriven(Policy):
    """EDS (Eq. 10): ``s = γ · H(U) / H(p(ỹ|x_t)) = γ · log K / H`` per sample.

    ``H`` is floored at ``entropy_floor`` nats so that a (numerically) one-hot prediction gives a
    large finite scale instead of inf/NaN (the paper's release has no floor). ``max_scale`` optionally
    caps ``s``.
    """

    name: ClassVar[str] = "eds"
    strength: ClassVar[str | None] = "gamma"
    sweep: ClassVar[tuple[float, ...]] = (0.3, 1.0, 3.0)

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

    def scale_args(self) -> tuple[float, float, float]:
        return (self.gamma, self.entropy_floor, self.max_scale or 0.0)

    def scale_of(self, out: ClassifierPass, state: GuidanceState) -> torch.Tensor:
        """The fused op's scale, computed in the pass from its own entropy (the same formula as
        ``__call__``, in one kernel); a subclass with its own ``__call__`` gets that instead."""
        if type(self).__call__ is not EntropyDriven.__call__:
            return super().scale_of(out, state)
        return out.fused_scale

    def trace_warning(self, trace) -> str | None:
        """Where an entropy fell below the floor (the scale is then γ·log K / floor), the first such sample."""
        if trace.entropy is None:
            return None
        low = (trace.entropy < self.entropy_floor).nonzero()
        if not len(low):
            return None
        step, i = (int(v) for v in low[0])
        return (f"entropy of sample {i} at step {step} is {trace.entropy[step, i].item():.3g} nats, below the EDS "
                f"floor {self.entropy_floor:g}: its scale is gamma*log(K)/floor; consider EntropyDriven(max_scale=...)")  # fmt: skip


@dataclass(frozen=True)
class ConstantRange(Policy):
    """The paper's "Constant (range 0-700)": ``s = c`` where original ``t ≤ t_max``, ``base`` above."""

    name: ClassVar[str] = "constant-range"
    strength: ClassVar[str | None] = "c"
    sweep: ClassVar[tuple[float, ...]] = (3.0, 10.0, 30.0)

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
class TimestepAware(Policy):
    """The paper's "Timestep-aware" policy: ``s = c · (T − t)`` with T the original number of steps."""

    name: ClassVar[str] = "timestep-aware"
    strength: ClassVar[str | None] = "c"
    sweep: ClassVar[tuple[float, ...]] = (0.003, 0.01, 0.03)

    c: float = 1.0  # the constant C

    def __post_init__(self):
        _check_strength("c", self.c)

    def __call__(self, state: GuidanceState) -> torch.Tensor:
        remaining = (state.num_timesteps - state.t.to(state.entropy.device)).float()
        return self.c * remaining


@dataclass(frozen=True)
class GradientNorm(Policy):
    """The paper's "Gradient Norm" policy: ``s = c`` when ``‖∇‖₂ < threshold`` (weak), else ``base``.

    Follows the paper's text, not its Eq. 13 (which rescales strong gradients); see the module doc.
    """

    name: ClassVar[str] = "gradient-norm"
    strength: ClassVar[str | None] = "c"
    sweep: ClassVar[tuple[float, ...]] = (3.0, 10.0, 30.0)

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


# every named policy (the CLI's --policy choices); the order is the results table's (fastguide reproduce)
POLICIES = {cls.name: cls for cls in (NoGuidance, Constant, ConstantRange, TimestepAware, GradientNorm, EntropyDriven)}
