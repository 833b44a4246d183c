"""A test double of what openai/guided-diffusion's own code does where guided-diffusion-sdk changed it.

In the original repository (and in the EDS paper's release, a fork of it) every ``AttentionBlock``
checkpoints, whatever its ``use_checkpoint`` flag: its forward is ``checkpoint(self._forward, (x,),
self.parameters(), True)``, and ``ResBlock`` checkpoints when ``use_checkpoint=True``. Their checkpoint is
an ``autograd.Function`` whose forward runs the block under ``no_grad`` and whose backward recomputes it
and differentiates *every* tensor it was handed, the parameters included (``autograd.grad(outputs,
inputs + params, allow_unused=True)``), so its backward fails with "One of the differentiated Tensors
does not require grad" when a parameter it was handed does not require grad. guided-diffusion-sdk, the
test-only dependency, passes ``use_checkpoint`` to the attention's checkpoint and differentiates only
what requires grad: networks built from it never meet that code.

:func:`original_checkpointing` gives the sdk's networks and fastguide's own ADM networks the original's
behaviour, written here from that description (no code of the original is copied).
"""

from __future__ import annotations

import contextlib
import importlib
from unittest import mock

import torch


class RecomputingCheckpoint(torch.autograd.Function):
    """The original's checkpoint: no activations kept; the backward recomputes the block and asks
    ``autograd.grad`` for the gradients of all its inputs and parameters. The context attributes are
    deleted after use, as the original does (torch.compile cannot trace that)."""

    @staticmethod
    def forward(ctx, run, num_inputs, *tensors):
        ctx.run, ctx.inputs, ctx.params = run, list(tensors[:num_inputs]), list(tensors[num_inputs:])
        with torch.no_grad():
            return run(*ctx.inputs)

    @staticmethod
    def backward(ctx, *output_grads):
        inputs = [t.detach().requires_grad_(True) for t in ctx.inputs]
        with torch.enable_grad():
            outputs = ctx.run(*[t.view_as(t) for t in inputs])
        grads = torch.autograd.grad(outputs, inputs + ctx.params, output_grads, allow_unused=True)
        del ctx.inputs, ctx.params
        return (None, None, *grads)


def checkpoint(run, inputs, params, flag: bool):
    """The original's ``checkpoint(func, inputs, params, flag)``: recomputed in the backward when ``flag``."""
    if not flag:
        return run(*inputs)
    return RecomputingCheckpoint.apply(run, len(inputs), *inputs, *params)


def _attention_forward(self, x):  # always checkpointed, as in the original
    return checkpoint(self._forward, (x,), self.parameters(), True)


def _resblock_forward(self, x, emb):
    return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)


# modules whose AttentionBlock and ResBlock get the original's forward
NETWORK_MODULES = ("guided_diffusion.unet", "fastguide.adm.networks.nn")


@contextlib.contextmanager
def original_checkpointing():
    """While the block runs, ADM networks (the sdk's and fastguide's) checkpoint as the original's do."""
    with contextlib.ExitStack() as stack:
        for name in NETWORK_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:  # no guided-diffusion-sdk: fastguide's networks only
                continue
            stack.enter_context(mock.patch.object(module.AttentionBlock, "forward", _attention_forward))
            stack.enter_context(mock.patch.object(module.ResBlock, "forward", _resblock_forward))
        yield


class WeightGradients(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts, while active, the convolution and GroupNorm backwards that compute a weight gradient and
    those that compute an input gradient (from their ``output_mask``)."""

    def __init__(self):
        super().__init__()
        self.weight = self.input = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = getattr(func, "overloadpacket", None)
        if packet is torch.ops.aten.convolution_backward:
            mask = kwargs.get("output_mask", args[-1])
            self.input += bool(mask[0])
            self.weight += bool(mask[1]) + bool(mask[2])
        elif packet is torch.ops.aten.native_group_norm_backward:
            mask = kwargs.get("output_mask", args[-1])
            self.input += bool(mask[0])
            self.weight += bool(mask[1]) + bool(mask[2])
        return func(*args, **kwargs)
