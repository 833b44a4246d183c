"""One guided step as a pure function of tensors: the unit that ``torch.compile`` and CUDA graphs take whole.

    x_t ─► eps-model(x_t, t) ─► (ε, v)
    x_t ─► classifier(x_t, t) ─► logits ─► softmax–entropy–scale ─► d log p(y)/d logits ─► ∇x log p(y|x_t)
        ─► policy (EDS: the fused op's own scale) ─► s           (fastguide.classifier, fastguide.guidance)
    (x_t, ε, v, s, ∇, z) ─► the solver's step (fastguide.solvers: the fused DDPM/DDIM update, or a
        multistep update with the carried history) ─► x_{t−1}

:func:`guided_step` has no host syncs and no Python branch on a tensor's value: the schedule is
gathered from device tables by index, and non-finite values are not raised but reported per sample
in a status tensor (:data:`CHECKS` × B), which the sampler reads once after the loop
(:func:`first_fault`). Shape checks are Python checks on static shapes: free once compiled.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .classifier import ClassifierPass, check_labels, classifier_pass, network_input
from .diffusion import StepOutput
from .guidance import GuidanceState, Policy, policy_scale
from .schedule import Schedule
from .solvers import SOLVERS, Carry, Solver, StepInputs

# what each row of a step's status tensor reports (in the order a fault is looked for within a step)
CHECKS = ("eps-model output", "classifier logits", "guidance scale", "classifier gradient", "guided update")
NONFINITE = {1: "nan", 2: "inf", 3: "-inf"}  # status codes of a tensor's non-finite values
LOGIT_FAULTS = {1: "nan", 2: "inf", 3: "-inf for every class"}  # status codes of a row of logits
GUIDANCE_ACTIONS = ("call", "reuse", "off")  # what a step does with the classifier (guidance_plan)


class StepRecord(NamedTuple):
    """Diagnostics of one step, per sample (None where no classifier was called)."""

    t: torch.Tensor  # (B,) original timesteps
    entropy: torch.Tensor | None  # (B,) H(p(ỹ|x_t)) in nats
    scale: torch.Tensor | None  # (B,) guidance scale s
    grad_norm: torch.Tensor | None  # (B,) ‖∇x log p(y|x_t)‖₂, before scaling
    p_target: torch.Tensor | None  # (B,) p(y|x_t) of the target class


class StepTables(NamedTuple):
    """The schedule as device tensors indexed by respaced index (gathered inside the step)."""

    coefs: torch.Tensor  # (N, NUM_COEFS) float32 coefficient rows (kernels.reference.COEF_FIELDS)
    t_model: torch.Tensor  # (N,) what the networks see (original t, or rescaled to 0..1000)
    t_orig: torch.Tensor  # (N,) int64 original timesteps
    solver: torch.Tensor | None = None  # (N, F) the solver's own coefficient rows (Solver.table), or None

    @classmethod
    def of(cls, schedule: Schedule, device: torch.device, method: str = "ddim") -> StepTables:
        every = torch.arange(schedule.num_steps)
        table = SOLVERS[method].table(schedule)
        return cls(
            schedule.coefficients(every).to(device),
            schedule.model_timesteps(every).to(device),
            schedule.original_timesteps(every).to(device),
            None if table is None else table.to(device),
        )


@dataclass(frozen=True, eq=False)
class StepSpec:
    """Everything about a step that is not a tensor: networks, policy, solver and the resolved ops."""

    model: Callable[..., torch.Tensor]  # eps-model (x, t[, y=]) -> (B, C or 2C, H, W)
    classifier: Callable[..., torch.Tensor] | None  # (x, t) -> (B, K) logits; None: unguided
    policy: Policy  # guidance-scale policy (fastguide.guidance.as_policy of the user's)
    num_timesteps: int  # T of the original schedule (for the policies)
    class_cond: bool  # whether the eps-model takes y
    solver: Solver  # the method, its settings and its resolved ops (fastguide.solvers)
    check_finite: bool  # report non-finite network outputs (the scale is always checked)
    num_classes: int | None  # K the classifier must return, if known
    entropy_op: Callable | None  # the resolved softmax_entropy_scale op
    autocast: torch.dtype | None = None  # run the networks under autocast to this dtype
    channels_last: bool = False  # feed the networks channels-last images
    cond_fn: Callable[..., torch.Tensor] | None = None  # instead of classifier and policy: ADM's cond_fn
    #   (x, t, y=) -> s·∇x log p(y|x_t), applied with scale 1 as ADM's loops apply it


def _networks(spec: StepSpec, x: torch.Tensor):
    """(input for the networks, autocast context) as the spec asks."""
    return network_input(x, spec.autocast, spec.channels_last)


def nonfinite_code(value: torch.Tensor) -> torch.Tensor:
    """(B,) int8 per sample: 0 if finite, else what it holds (:data:`NONFINITE`): NaN before +inf before −inf."""
    flat = value.detach().reshape(value.shape[0], -1)
    nan, inf, neg = flat.isnan().any(dim=1), (flat == math.inf).any(dim=1), (flat == -math.inf).any(dim=1)
    return torch.where(nan, 1, torch.where(inf, 2, torch.where(neg, 3, 0))).to(torch.int8)


def logits_code(logits: torch.Tensor) -> torch.Tensor:
    """(B,) int8 per sample: 0 if p(y|x_t) is defined, else why not (:data:`LOGIT_FAULTS`): a NaN, a +inf,
    or every class at −inf (some classes at −inf is fine: they get p = 0)."""
    z = logits.detach()
    nan, inf, none = z.isnan().any(dim=1), (z == math.inf).any(dim=1), (z == -math.inf).all(dim=1)
    return torch.where(nan, 1, torch.where(inf, 2, torch.where(none, 3, 0))).to(torch.int8)


def eps_and_v(spec: StepSpec, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, model_kwargs: dict | None = None):
    """(ε, v or None) in float32 from the eps-model, and its raw output; the output's shape is checked.
    ``model_kwargs`` are passed to the model as they are (ADM's model_kwargs, e.g. super-resolution's low_res)."""
    x_in, ctx = _networks(spec, x)
    kwargs = {**(model_kwargs or {}), **({"y": y} if spec.class_cond else {})}
    with torch.no_grad(), ctx:
        out = spec.model(x_in, t, **kwargs)
    b, c = x.shape[:2]
    if out.dim() != 4 or out.shape[0] != b or out.shape[1] not in (c, 2 * c) or out.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"eps-model returned shape {tuple(out.shape)} for input {tuple(x.shape)}; "
            f"expected ({b}, {c} or {2 * c}, {x.shape[2]}, {x.shape[3]})"
        )
    out = out.float().contiguous()
    eps, v = (out, None) if out.shape[1] == c else out.split(c, dim=1)
    return eps.contiguous(), (None if v is None else v.contiguous()), out


def guidance_pass(
    spec: StepSpec, x: torch.Tensor, t_model: torch.Tensor, t_orig: torch.Tensor, y: torch.Tensor,
    max_label: int | None = None,
) -> tuple[ClassifierPass, torch.Tensor]:  # fmt: skip
    """The classifier's part of a step: (the :func:`~fastguide.classifier.classifier_pass`, the policy's scale s).
    ``max_label`` (the largest of y) is checked against the logits' K in Python; None: not checked."""
    policy = spec.policy
    out = classifier_pass(
        spec.classifier, x, t_model, y, entropy_op=spec.entropy_op, scale_args=policy.scale_args(),
        num_classes=spec.num_classes, check=None if max_label is None else functools.partial(check_labels, max_label),
        autocast=spec.autocast, channels_last=spec.channels_last,
    )  # fmt: skip
    return out, policy_scale(policy, out, GuidanceState.of(out, t_orig, spec.num_timesteps))


def guided_step(
    spec: StepSpec, tables: StepTables, x: torch.Tensor, index: torch.Tensor, y: torch.Tensor,
    noise: torch.Tensor | None, max_label: int | None = None, carry: Carry | None = None, guidance: str = "call",
    model_kwargs: dict[str, torch.Tensor] | None = None,
) -> tuple[StepOutput, StepRecord, torch.Tensor, Carry]:  # fmt: skip
    """One guided step of every sample from its respaced index ``index`` (B,) (samples may differ).

    Args:
        x: (B, C, H, W) float32 x_t.  y: (B,) int64 target classes.
        noise: (B, C, H, W) standard normal noise (DDPM, or DDIM with eta > 0), else None.
        max_label: the largest of y, to check against the classifier's logits (eager calls; None: skip).
        carry: what the previous step handed on (:class:`~fastguide.solvers.Carry`; zeros at the first
            step): the multistep solvers' history and the last guidance. None: zeros.
        guidance: ``"call"`` the classifier, ``"reuse"`` the carried scale and gradient, or ``"off"`` (no
            guidance at this step) (:func:`guidance_plan`). Only "call" applies to unguided or cond_fn steps.
        model_kwargs: more keyword arguments of the eps-model (and of a cond_fn), per-sample tensors (B, ...),
            as ADM's loops pass model_kwargs (super-resolution's ``low_res``); None: none.
    Returns:
        (StepOutput(x_{t−1}, x̂0), StepRecord, status, carry): status is (len(CHECKS), B) int8, nonzero where
        a check failed (:func:`nonfinite_code`, :func:`logits_code`); nothing is raised for values.
    """
    if guidance not in GUIDANCE_ACTIONS:
        raise ValueError(f"unknown guidance action {guidance!r}; expected one of {GUIDANCE_ACTIONS}")
    coefs, t_model, t_orig = tables.coefs[index], tables.t_model[index], tables.t_orig[index]
    carry = Carry.zeros(x) if carry is None else carry
    nonzero = (index != 0).float()
    eps, v, raw = eps_and_v(spec, x, t_model, y, model_kwargs)
    zeros = torch.zeros(x.shape[0], dtype=torch.int8, device=x.device)
    eps_status = nonfinite_code(raw) if spec.check_finite else zeros
    if spec.classifier is not None and guidance != "call":  # the classifier is not called at this step
        scale = carry.scale if guidance == "reuse" else torch.zeros_like(carry.scale)
        grad = carry.grad if guidance == "reuse" else None
        unknown = torch.full_like(scale, math.nan)
        record = StepRecord(t_orig, unknown, scale, unknown, unknown)
        status = [eps_status, zeros, zeros, zeros]
        scale = scale if guidance == "reuse" else None
    elif spec.cond_fn is not None:  # an ADM cond_fn gives the scaled gradient: applied with s = 1
        with _networks(spec, x)[1]:  # its classifier under the networks' autocast
            grad = spec.cond_fn(x, t_model, y=y, **(model_kwargs or {})).float()
        scale = torch.ones(x.shape[0], device=x.device)
        record = StepRecord(t_orig, None, scale, grad.flatten(1).norm(dim=1), None)
        grad_status = nonfinite_code(grad) if spec.check_finite else zeros
        status = [eps_status, zeros, zeros, grad_status]
    elif spec.classifier is None:
        grad = scale = None
        record = StepRecord(t_orig, None, None, None, None)
        status = [eps_status, zeros, zeros, zeros]
    else:
        out, scale = guidance_pass(spec, x, t_model, t_orig, y, max_label)
        grad = out.grad.float()
        scale_status = nonfinite_code(scale)
        # without check_finite, bad logits are named only where they made the scale non-finite
        logits = out.logits
        logit_status = logits_code(logits) if spec.check_finite else torch.where(scale_status != 0, logits_code(logits), 0)
        grad_status = nonfinite_code(grad) if spec.check_finite else zeros
        record = StepRecord(t_orig, out.entropy, scale, out.grad_norm, out.log_prob.exp())
        status = [eps_status, logit_status.to(torch.int8), scale_status, grad_status]
    if grad is not None and guidance == "call":
        carry = carry._replace(scale=scale, grad=grad)
    row = None if tables.solver is None else tables.solver[index]
    x_prev, xstart, carry = spec.solver.step(StepInputs(x, eps, v, grad, scale, noise, coefs, row, nonzero), carry)
    # a finite scale and gradient whose product overflows float32 show here, not as the next step's eps-model
    update_status = nonfinite_code(x_prev) if spec.check_finite else zeros
    return StepOutput(x_prev, xstart), record, torch.stack([*status, update_status]), carry


def guidance_plan(timesteps: list[int], interval: tuple[int, int] | None, every: int) -> list[str]:
    """What each step does with the classifier (:data:`GUIDANCE_ACTIONS`), for the original timesteps of
    the steps in order: "call" it inside ``interval`` (inclusive original timesteps; None: everywhere) at
    the first step and every ``every``-th after, "reuse" the last scale and gradient at the steps between,
    "off" (no guidance) outside."""
    plan, inside = [], 0
    for t in timesteps:
        if interval is not None and not interval[0] <= t <= interval[1]:
            plan.append("off")
            continue
        plan.append("call" if inside % every == 0 else "reuse")
        inside += 1
    return plan


def fault_location(statuses: list[torch.Tensor]) -> tuple[int, int, int, int] | None:
    """(step of the list, check, sample, code) of the first non-finite value in per-step statuses (earliest
    step, then the checks' order, then the lowest sample), or None. One host sync."""
    if not statuses:
        return None
    codes = torch.stack(statuses).cpu()  # (S, len(checks), B)
    bad = codes.nonzero()
    if not len(bad):
        return None
    k, check, sample = (int(v) for v in bad[0])  # nonzero() lists indices in row-major order
    return k, check, sample, int(codes[k, check, sample])


def first_fault(
    statuses: list[torch.Tensor], t_of: Callable[[int, int], int], checks: tuple[str, ...] = CHECKS, first_step: int = 0
) -> str | None:
    """The message of the first non-finite value in per-step statuses (earliest step, then ``checks`` order,
    then the lowest sample), or None. Step k of the list is step ``first_step + k`` of the run; ``t_of(step,
    sample)`` gives the original timestep named in the message. One host sync for the whole run."""
    found = fault_location(statuses)
    if found is None:
        return None
    k, check, sample, code = found
    step = first_step + k
    where = f"for sample {sample} at step {step} (t={t_of(step, sample)})"
    if checks[check] == "classifier logits":
        return (f"classifier logits are {LOGIT_FAULTS[code]} {where}: p(y|x_t), its entropy and the guidance scale "
                "are undefined")  # fmt: skip
    if checks[check] == "guided update":
        return (f"the guided update gave {NONFINITE[code]} {where} from finite network outputs: the guidance "
                "(scale times gradient) is too large for float32")  # fmt: skip
    return f"{checks[check]} is {NONFINITE[code]} {where}"
