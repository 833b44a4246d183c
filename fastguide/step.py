"""One guided step as a pure function of tensors: the unit that ``torch.compile`` and CUDA graphs take whole.

    x_t ─► eps-model(x_t, t) ─► (ε, v)
    x_t ─► classifier(x_t, t) ─► logits ─► softmax–entropy–scale ─► d log p(y)/d logits ─► ∇x log p(y|x_t)
        ─► policy (EDS: the fused op's own scale) ─► s
    (x_t, ε, v, s, ∇, z) ─► guided DDPM/DDIM update ─► x_{t−1}
    (or ε − sqrt(1−ᾱ)·s·∇ ─► DPM-Solver++(2M)/UniPC update with the carried history, fastguide.solvers)

:func:`guided_step` has no host syncs and no Python branch on a tensor's value: the schedule is
gathered from device tables by index, and non-finite values are not raised but reported per sample
in a status tensor (:data:`CHECKS` × B), which the sampler reads once after the loop
(:func:`first_fault`). Shape checks are Python checks on static shapes: free once compiled.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .diffusion import StepOutput
from .guidance import EntropyDriven, GuidanceState
from .kernels.reference import VARIANCE_CODES
from .schedule import Schedule, StepCoefficients
from .solvers import MULTISTEP, Carry, multistep_table, multistep_update

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
    solver: torch.Tensor | None = None  # (N, len(SOLVER_FIELDS)) multistep coefficient rows (solvers.py)

    @classmethod
    def of(cls, schedule: Schedule, device: torch.device, method: str = "ddim") -> StepTables:
        every = torch.arange(schedule.num_steps)
        return cls(
            schedule.coefficients(every).to(device),
            schedule.model_timesteps(every).to(device),
            schedule.original_timesteps(every).to(device),
            multistep_table(schedule, method).to(device) if method in MULTISTEP else None,
        )


@dataclass(frozen=True, eq=False)
class StepSpec:
    """Everything about a step that is not a tensor: networks, policy, update and the resolved ops."""

    model: Callable[..., torch.Tensor]  # eps-model (x, t[, y=]) -> (B, C or 2C, H, W)
    classifier: Callable[..., torch.Tensor] | None  # (x, t) -> (B, K) logits; None: unguided
    policy: Callable[[GuidanceState], torch.Tensor]  # guidance-scale policy
    num_timesteps: int  # T of the original schedule (for the policies)
    class_cond: bool  # whether the eps-model takes y
    method: str  # "ddpm", "ddim", or a multistep solver ("dpmpp2m", "unipc")
    eta: float  # DDIM stochasticity
    clip_denoised: bool  # clip x̂0 to [-1, 1]
    variance: str  # DDPM variance, or "auto" (learned range for 2C outputs, else fixed large)
    paper_form: bool  # DDIM guidance ε − s∇ (Alg. 1) instead of ADM's ε − sqrt(1−ᾱ)·s∇
    check_finite: bool  # report non-finite network outputs (the scale is always checked)
    num_classes: int | None  # K the classifier must return, if known
    entropy_op: Callable | None  # the resolved softmax_entropy_scale op
    update_op: Callable  # the resolved guided_ddpm_update or guided_ddim_update op
    autocast: torch.dtype | None = None  # run the networks under autocast to this dtype
    channels_last: bool = False  # feed the networks channels-last images
    cond_fn: Callable[..., torch.Tensor] | None = None  # instead of classifier and policy: ADM's cond_fn
    #   (x, t, y=) -> s·∇x log p(y|x_t), applied with scale 1 as ADM's loops apply it
    dynamic_threshold: float | None = None  # multistep solvers: dynamic thresholding's quantile of |x̂0|
    threshold_max: float = 1.0  # its largest threshold


def _networks(spec: StepSpec, x: torch.Tensor):
    """(input for the networks, autocast context) as the spec asks."""
    if spec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if spec.autocast is None:
        return x, contextlib.nullcontext()
    return x, torch.autocast(x.device.type, dtype=spec.autocast)


# classifiers with an autograd.Function of their own that differentiates the parameters it is handed
# (ADM's original gradient checkpoint), found at their first pass (classifier_pass)
_DIFFERENTIATES_PARAMETERS: weakref.WeakSet = weakref.WeakSet()
# classifiers whose backward needs the forward's autocast (an autograd.Function that recomputes its block in
# the backward without restoring it, as ADM's checkpoints do: bf16 activations meet float32 weights there),
# found at their first pass under autocast; their backward runs under the same autocast as their forward
_RECOMPUTES_UNDER_AUTOCAST: weakref.WeakSet = weakref.WeakSet()


def _input_gradient_call(net, *args):
    """``net(*args)`` for a backward that differentiates its input only (nn.Module; anything else is called as is).

    The parameters are stood in for by tensors that share their storage, so no parameter ever receives
    ``.grad`` and autograd computes no parameter gradient (the backward asks for the input's alone, and the
    weight-gradient halves of each layer's backward are pruned). The stand-ins are detached; for a network
    whose own ``autograd.Function`` differentiates the parameters it is handed (ADM's original checkpoint:
    ``autograd.grad(outputs, inputs + params)``, which fails on tensors that do not require grad) they are
    leaves that require grad. Such a checkpoint recomputes its block in the backward with the module's own
    parameters (the stand-ins are swapped back when the forward returns), so the stand-ins it asks about are
    unused there and no parameter gradient is computed either.
    """
    if not isinstance(net, nn.Module):
        return net(*args)
    # a compiled step traces detached stand-ins (such a checkpoint cannot be traced: the sampler then runs the
    # classifier pass eagerly); the WeakSet stays out of the trace
    leaves = not torch.compiler.is_compiling() and net in _DIFFERENTIATES_PARAMETERS
    params = {name: p.detach().requires_grad_(leaves) for name, p in net.named_parameters()}
    return torch.func.functional_call(net, params, args)


def differentiates_parameters(net) -> bool:
    """Whether the classifier pass found that ``net`` differentiates the parameters it hands to an
    ``autograd.Function`` of its own (ADM's original gradient checkpoint), which torch.compile cannot trace."""
    return isinstance(net, nn.Module) and net in _DIFFERENTIATES_PARAMETERS


def _learned_from(spec: StepSpec, err: RuntimeError) -> bool:
    """Whether ``err``, raised by the classifier's backward, teaches how to run this classifier (it is remembered and
    the pass is run again): a network that differentiates the detached stand-ins of its parameters gets
    stand-ins that require grad; a network whose backward fails under autocast gets its backward under the
    forward's autocast (a checkpoint that recomputes its block there). Anything else is not learned."""
    net = spec.classifier
    if not isinstance(net, nn.Module):
        return False
    if "does not require grad" in str(err) and net not in _DIFFERENTIATES_PARAMETERS:
        _DIFFERENTIATES_PARAMETERS.add(net)
        return True
    if spec.autocast is not None and net not in _RECOMPUTES_UNDER_AUTOCAST:
        _RECOMPUTES_UNDER_AUTOCAST.add(net)
        return True
    return False


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


def check_labels(max_label: int, num_classes: int) -> None:
    """ValueError when a target class id is not among the classifier's ``num_classes`` logits."""
    if max_label >= num_classes:
        raise ValueError(f"class id {max_label} is out of range for the classifier's {num_classes} classes")


def classifier_pass(spec: StepSpec, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, max_label: int | None = None):
    """(logits, fused softmax–entropy–scale, ∇x log p(y|x_t)): one forward, and one backward seeded with
    d log p(y)/d logits = onehot(y) − p from the fused op (the gradient of Σ_i log p(y_i|x_i), as ADM's
    cond_fn). For EDS the fused op also gives the scale γ·log K / max(H, floor)."""
    eds = spec.policy if isinstance(spec.policy, EntropyDriven) else None
    args = (1.0, 1e-6, 0.0) if eds is None else (eds.gamma, eds.entropy_floor, eds.max_scale or 0.0)
    while True:
        try:
            logits, fused, grad = _classifier_pass(spec, x, t, y, max_label, args)
            break
        except _BackwardFailed as failed:  # run again with what it taught (each lesson once), or raised
            if not _learned_from(spec, failed.args[0]):
                raise failed.args[0] from None
    return logits.detach(), fused, grad.float()


def _classifier_pass(spec: StepSpec, x, t, y, max_label, args):
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        x_net, ctx = _networks(spec, x_in)
        with ctx:
            logits = _input_gradient_call(spec.classifier, x_net, t)
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"classifier returned shape {tuple(logits.shape)}; expected ({x.shape[0]}, K)")
        if spec.num_classes is not None and logits.shape[1] != spec.num_classes:
            raise ValueError(f"classifier returned {logits.shape[1]} logits; expected {spec.num_classes}")
        if max_label is not None:  # the labels' range is checked in Python (no sync): eagerly, before compiling
            check_labels(max_label, logits.shape[1])
        fused = spec.entropy_op(logits.detach().float(), y, *args)
        # the backward outside autocast (its formulas in the dtypes autograd saved), but where a network
        # recomputes blocks in its backward, under the forward's autocast (torch.utils.checkpoint's rule)
        # (the compiled step traces neither: such a checkpoint cannot be traced, and the WeakSet stays out)
        recomputes = not torch.compiler.is_compiling() and spec.classifier in _RECOMPUTES_UNDER_AUTOCAST
        try:
            with ctx if recomputes else contextlib.nullcontext():
                (grad,) = torch.autograd.grad(logits, x_in, grad_outputs=fused.dlogits.to(logits.dtype))
        except RuntimeError as err:
            raise _BackwardFailed(err) from err
    return logits, fused, grad


class _BackwardFailed(Exception):
    """The classifier's backward raised ``args[0]`` (classifier_pass learns from it or raises it)."""


def guidance_pass(
    spec: StepSpec, x: torch.Tensor, t_model: torch.Tensor, t_orig: torch.Tensor, y: torch.Tensor,
    max_label: int | None = None,
):  # fmt: skip
    """The classifier's part of a step: (logits, fused softmax–entropy–scale, ∇x log p(y|x_t), ‖∇‖₂, s).
    EDS takes the fused op's scale; any other policy is called on the step's :class:`GuidanceState`."""
    logits, fused, grad = classifier_pass(spec, x, t_model, y, max_label)
    grad_norm = grad.flatten(1).norm(dim=1)
    if isinstance(spec.policy, EntropyDriven):
        return logits, fused, grad, grad_norm, fused.scale
    state = GuidanceState(t_orig, spec.num_timesteps, logits.shape[1], fused.entropy, grad_norm, fused.log_prob)
    scale = torch.as_tensor(spec.policy(state), dtype=torch.float32, device=x.device).detach()
    if scale.shape != (x.shape[0],):
        raise ValueError(f"policy returned a scale of shape {tuple(scale.shape)}; expected ({x.shape[0]},)")
    return logits, fused, grad, grad_norm, scale


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
        logits, fused, grad, grad_norm, scale = guidance_pass(spec, x, t_model, t_orig, y, max_label)
        scale_status = nonfinite_code(scale)
        # without check_finite, bad logits are named only where they made the scale non-finite
        logit_status = logits_code(logits) if spec.check_finite else torch.where(scale_status != 0, logits_code(logits), 0)
        grad_status = nonfinite_code(grad) if spec.check_finite else zeros
        record = StepRecord(t_orig, fused.entropy, scale, grad_norm, fused.log_prob.exp())
        status = [eps_status, logit_status.to(torch.int8), scale_status, grad_status]
    if grad is not None and guidance == "call":
        carry = carry._replace(scale=scale, grad=grad)
    if spec.method in MULTISTEP:
        c = StepCoefficients.of(coefs)
        if grad is not None:
            weight = scale.view(-1, 1, 1, 1)
            if not spec.paper_form:  # sqrt(1 − ᾱ) as sqrt(1/ᾱ − 1)/sqrt(1/ᾱ), without cancellation
                weight = weight * (c.sqrt_recipm1_alpha_bar / c.sqrt_recip_alpha_bar)
            eps = eps - weight * grad
        x_prev, xstart, corrected = multistep_update(
            x, eps, (c.sqrt_recip_alpha_bar, c.sqrt_recipm1_alpha_bar), tables.solver[index],
            carry, spec.clip_denoised, spec.dynamic_threshold, spec.threshold_max,
        )  # fmt: skip
        carry = carry._replace(d1=xstart, d2=carry.d1, x_last=corrected)
    elif spec.method == "ddim":
        x_prev, xstart = spec.update_op(
            x, eps, grad, scale, noise, coefs, nonzero, spec.eta, spec.clip_denoised, spec.paper_form
        )
    else:
        variance = spec.variance if spec.variance != "auto" else ("fixed_large" if v is None else "learned_range")
        if variance.startswith("learned") and v is None:
            raise ValueError(f"variance {variance!r} needs a model with 2C output channels (eps and v)")
        x_prev, xstart = spec.update_op(
            x, eps, v, grad, scale, noise, coefs, nonzero, VARIANCE_CODES[variance], spec.clip_denoised
        )
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
