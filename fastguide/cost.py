"""Whether compiling the guided step repays itself on the CPU: the rule behind ``SamplerConfig(compile=None)``.

On CUDA the step is always compiled. On a CPU, torch.compile costs a minute or more the first time (inductor
writes and builds C++), and it saves a few milliseconds per sample and step, in proportion to the networks'
arithmetic. So ``compile=None`` compiles on the CPU when

    image-steps × FLOPs per image-step × SAVED_S_PER_FLOP  >  operations per step × COLD_COMPILE_S_PER_OP

where the FLOPs and the operations are counted by running the sampler's own step once at batch 1
(:func:`step_cost`: on real tensors for networks in eval mode, else on fake ones, which compute nothing),
and the two constants were measured on CPUs with native bf16 (benchmarks/RESULTS.md, "compile=None on the
CPU"). It applies where the step's networks run in bf16 on a CPU
with native bf16 (AMX-BF16, AVX512-BF16), the case the constants were measured for; elsewhere the CPU runs
eagerly.

The rule is deterministic: it reads the networks, the run's length and the CPU's kind, never a clock or the
machine's load, and it counts a cold compile even where inductor's cache is warm (fastguide.compile_cache),
so that a command gives the same samples (compiled and eager steps round differently) whatever ran before it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

# measured on 2-vCPU AMD EPYCs with AVX512-BF16, torch 2.13.0 (benchmarks/RESULTS.md, "compile=None on
# the CPU"). Saved: the compiled bf16 step against the eager bf16 step, 1.55e-12 s per FLOP (adm64-small, batch 1),
# 2.17e-12 (embedded, batch 16), 2.38e-12 (adm64-small, batch 16): the smallest is taken. A cold compile (first
# call with an empty inductor cache): 98 s for the embedded models' 1016 operations (0.097 s each), 249 s for
# adm64-small's 3382 (0.074 s): rounded up. Both err towards eager.
SAVED_S_PER_FLOP = 1.5e-12  # seconds an image-step saves compiled, per FLOP of the image-step
COLD_COMPILE_S_PER_OP = 0.1  # seconds of a cold compile, per operation of the step


class StepCost(NamedTuple):
    """What one guided step costs, counted as it runs at batch 1 (:func:`step_cost`)."""

    flops: int  # per sample: the eps-model's forward, the classifier's forward and input-gradient backward
    ops: int  # operations per step (whatever the batch): what eager mode dispatches one by one and inductor compiles


_METADATA = {
    torch.ops.prim.device.default, torch.ops.prim.layout.default, torch.ops.aten.size.default,
    torch.ops.aten.sym_size.default, torch.ops.aten.stride.default, torch.ops.aten.sym_stride.default,
    torch.ops.aten.numel.default, torch.ops.aten.sym_numel.default, torch.ops.aten.dim.default,
    torch.ops.aten.storage_offset.default, torch.ops.aten.sym_storage_offset.default,
    torch.ops.aten.is_contiguous.default, torch.ops.aten.is_contiguous.memory_format,
}  # fmt: skip


class _Count(TorchDispatchMode):
    """Counts the operations dispatched and their FLOPs (torch.utils.flop_counter's formulas; without its module
    hooks, which refuse autograd.grad of a leaf input)."""

    def __init__(self):
        super().__init__()
        self.ops = self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _METADATA:  # queries that fake tensors dispatch and real ones answer in C++
            return out
        self.ops += 1
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def count(fn: Callable[[], object]) -> StepCost:
    """The FLOPs and operations of ``fn()`` as it runs (on real or fake tensors)."""
    with _Count() as counter:
        fn()
    return StepCost(counter.flops, counter.ops)


def step_cost(step: Callable[[], object], fake: bool = True) -> StepCost | None:
    """The FLOPs and operations of ``step()`` (one step at batch 1, its tensors made inside the call). On
    fake tensors (``fake``) it computes nothing: shapes only, the networks' weights and buffers untouched;
    else it runs on real tensors, faster (the embedded models' step: 0.07 s against 0.43 s; adm64-small's:
    0.5 s against 1.1 s) and safe for networks without state (in eval mode: no dropout to draw, no running
    statistics to update). None where the step cannot run on
    fake tensors (a network that reads a value on the host, an operation without a fake kernel) or fails."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
            return count(step)
    except Exception:  # noqa: BLE001 - any failure means "no estimate": the caller stays eager
        return None


class Estimate(NamedTuple):
    """The rule's figures for one run (:func:`estimate`)."""

    saved_s: float  # what compiling would save over the run
    compile_s: float  # what a cold compile of the run's distinct steps would cost

    @property
    def repays(self) -> bool:
        return self.saved_s > self.compile_s


def estimate(costs: dict[str, StepCost], plan: list[str], samples: int) -> Estimate:
    """The rule for a run of ``samples`` samples through the steps of ``plan`` (one action per step, such as
    "call" the classifier or "reuse" its last gradient), each action's step costing ``costs[action]`` (at
    batch 1): the time saved, ``samples × Σ_steps FLOPs × SAVED_S_PER_FLOP``, against a cold compile,
    ``COLD_COMPILE_S_PER_OP`` per operation of each action's step (each action is its own graph)."""
    flops = sum(costs[action].flops for action in plan)
    ops = sum(costs[action].ops for action in set(plan))
    return Estimate(samples * flops * SAVED_S_PER_FLOP, ops * COLD_COMPILE_S_PER_OP)
