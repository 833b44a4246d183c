"""The classifier's part of a guided step: one forward and one backward give all a guidance policy may need.

    x_t ─► classifier(x_t, t) ─► logits ─► softmax–entropy–scale (the fused op) ─► log p(y), H, γ·log K / H,
        d log p(y)/d logits ─► backward ─► ∇x log p(y|x_t), ‖∇‖₂

:func:`classifier_pass` is the only place fastguide runs a classifier for guidance: the sampler's step,
ADM's cond_fn (:mod:`fastguide.adm.integration`) and :func:`fastguide.classifier_gradient` (the gradient maps)
all call it. The backward asks for the input's gradient alone: the parameters are stood in for by detached
tensors sharing their storage, so no weight gradient is computed and no ``.grad`` is written. What a
network's first pass teaches (a checkpoint that differentiates the parameters it is handed, or one that
recomputes its block under the forward's autocast) is remembered per network.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from . import ops
from .entropy import DEFAULT_ENTROPY_FLOOR

# the fused op's (γ, entropy floor, max scale) when no policy asks for its EDS scale
NO_SCALE_ARGS = (1.0, DEFAULT_ENTROPY_FLOOR, 0.0)


class ClassifierPass(NamedTuple):
    """What one classifier pass gives (B samples, K classes)."""

    logits: torch.Tensor  # (B, K) as the classifier returned them, detached
    log_prob: torch.Tensor  # (B,) float32 log p(y|x_t)
    entropy: torch.Tensor  # (B,) float32 H(p(ỹ|x_t)) in nats
    grad_norm: torch.Tensor  # (B,) float32 ‖∇x log p(y|x_t)‖₂
    grad: torch.Tensor  # (B, C, H, W) ∇x log p(y|x_t), unscaled, in x's dtype
    fused_scale: torch.Tensor  # (B,) float32 the fused op's γ·log K / max(H, floor) (capped) for its scale_args


def network_input(x: torch.Tensor, autocast: torch.dtype | None = None, channels_last: bool = False):
    """(input for a network, its autocast context): x channels-last if asked, autocast to ``autocast`` if given."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if autocast is None:
        return x, contextlib.nullcontext()
    return x, torch.autocast(x.device.type, dtype=autocast)


def check_labels(max_label: int, num_classes: int) -> None:
    """ValueError when a target class id is not among the classifier's ``num_classes`` logits."""
    if max_label >= num_classes:
        raise ValueError(f"class id {max_label} is out of range for the classifier's {num_classes} classes")


# classifiers with an autograd.Function of their own that differentiates the parameters it is handed
# (ADM's original gradient checkpoint), found at their first pass
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


def _learned_from(net, autocast: torch.dtype | None, err: RuntimeError) -> bool:
    """Whether ``err``, raised by the classifier's backward, teaches how to run this classifier (it is remembered and
    the pass is run again): a network that differentiates the detached stand-ins of its parameters gets
    stand-ins that require grad; a network whose backward fails under autocast gets its backward under the
    forward's autocast (a checkpoint that recomputes its block there). Anything else is not learned."""
    if not isinstance(net, nn.Module):
        return False
    if "does not require grad" in str(err) and net not in _DIFFERENTIATES_PARAMETERS:
        _DIFFERENTIATES_PARAMETERS.add(net)
        return True
    if autocast is not None and net not in _RECOMPUTES_UNDER_AUTOCAST:
        _RECOMPUTES_UNDER_AUTOCAST.add(net)
        return True
    return False


class _BackwardFailed(Exception):
    """The classifier's backward raised ``args[0]`` (classifier_pass learns from it or raises it)."""


def classifier_pass(
    classifier: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
    entropy_op: Callable | None = None, scale_args: tuple[float, float, float] = NO_SCALE_ARGS,
    num_classes: int | None = None, check: Callable[[int], None] | None = None,
    autocast: torch.dtype | None = None, channels_last: bool = False,
) -> ClassifierPass:  # fmt: skip
    """One forward of ``classifier(x, t)`` and one backward seeded with d log p(y)/d logits = onehot(y) − p from
    the fused softmax–entropy–scale op (the gradient of Σ_i log p(y_i|x_i), as ADM's cond_fn).

    Args:
        entropy_op: the resolved ``softmax_entropy_scale`` (None: :func:`fastguide.ops.softmax_entropy_scale`,
            dispatched at each call).
        scale_args: the fused op's (γ, entropy floor, max scale) for :attr:`ClassifierPass.fused_scale`
            (a policy's :meth:`~fastguide.guidance.Policy.scale_args`).
        num_classes: the K the logits must have, if known.
        check: called with the logits' K after the forward and before the fused op (label checks:
            :func:`check_labels`), in Python, so free once compiled.
        autocast, channels_last: how the network is run (:func:`network_input`); the backward runs outside
            autocast, except for a network that recomputes blocks in its backward (learned at its first pass).
    Raises:
        ValueError: the logits have the wrong shape, or ``check`` raised.
    """
    op = ops.softmax_entropy_scale if entropy_op is None else entropy_op
    while True:
        try:
            logits, fused, grad = _forward_backward(classifier, x, t, y, op, scale_args, num_classes, check,
                                                    autocast, channels_last)  # fmt: skip
            break
        except _BackwardFailed as failed:  # run again with what it taught (each lesson once), or raised
            if not _learned_from(classifier, autocast, failed.args[0]):
                raise failed.args[0] from None
    grad_norm = grad.float().flatten(1).norm(dim=1)
    return ClassifierPass(logits.detach(), fused.log_prob, fused.entropy, grad_norm, grad, fused.scale)


def _forward_backward(classifier, x, t, y, op, scale_args, num_classes, check, autocast, channels_last):
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        x_net, ctx = network_input(x_in, autocast, channels_last)
        with ctx:
            logits = _input_gradient_call(classifier, x_net, t)
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"classifier returned shape {tuple(logits.shape)}; expected ({x.shape[0]}, K)")
        if num_classes is not None and logits.shape[1] != num_classes:
            raise ValueError(f"classifier returned {logits.shape[1]} logits; expected {num_classes}")
        if check is not None:  # the labels' range is checked in Python (no sync): eagerly, before compiling
            check(logits.shape[1])
        fused = op(logits.detach().float(), y, *scale_args)
        # the backward outside autocast (its formulas in the dtypes autograd saved), but where a network
        # recomputes blocks in its backward, under the forward's autocast (torch.utils.checkpoint's rule)
        # (the compiled step traces neither: such a checkpoint cannot be traced, and the WeakSet stays out)
        recomputes = not torch.compiler.is_compiling() and classifier in _RECOMPUTES_UNDER_AUTOCAST
        try:
            with ctx if recomputes else contextlib.nullcontext():
                (grad,) = torch.autograd.grad(logits, x_in, grad_outputs=fused.dlogits.to(logits.dtype))
        except RuntimeError as err:
            raise _BackwardFailed(err) from err
    return logits, fused, grad
