"""The step of one sampler on one device and batch shape, eager or compiled (:class:`StepRunner`): the whole
guided step as one ``torch.compile`` graph per guidance action, replayed as a CUDA graph where asked, and the
fallbacks when it cannot be one graph (the eps-model compiled alone, or eager), each said once."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import types
import warnings
from collections.abc import Callable

import torch

from .classifier import differentiates_parameters
from . import step_store
from .compile_cache import cacheable_autocast, use_user_cache
from .config import FastPath
from .solvers import Carry
from .step import StepSpec, StepTables, guided_step


# what tracing or compiling raises when the step cannot be one graph (a graph break in a policy, a backend
# failure); a recompilation refused by error_on_recompile is not among them: it propagates
COMPILE_REFUSALS = (
    torch._dynamo.exc.Unsupported, torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.UserError,
    torch._dynamo.exc.TorchRuntimeError,
)  # fmt: skip


class StepRunner:
    """The step of one sampler on one device and batch shape: eager, or compiled (and graph-replayed).

    Compiled, the first call for a shape (and a call with a larger label than before) also runs the step
    eagerly, to check the networks' output shapes and the labels with proper errors, and drops that result:
    a sample never depends on which calls came before it. If the step cannot be one graph, it says why once
    and runs with the eps-model compiled alone (or eagerly), from its first result on.
    """

    def __init__(self, spec: StepSpec, tables: StepTables, fast: FastPath):
        self.spec, self.tables, self.fast = spec, tables, fast
        self.validated = False
        self.max_label_checked = -1  # labels up to this one are known to be among the classifier's classes
        # one compiled step per guidance action ("call", "reuse", "off"): each its own graph, none a recompilation
        self.compiled: dict[str, Callable] | None = {} if fast.compile else None
        self.graphs_refused = False  # said that CUDA graphs cannot be captured
        self._indices: dict[tuple[int, int], torch.Tensor] = {}

    def _compiled(self, guidance: str, args: tuple) -> Callable:
        if guidance not in self.compiled:
            mode = "reduce-overhead" if self.fast.cuda_graphs else None
            # FASTGUIDE_COMPILE_BACKEND=aot_eager traces exactly as inductor does, without its code generation
            backend = os.environ.get("FASTGUIDE_COMPILE_BACKEND", "inductor")
            step = own_code(step_of(self.spec, self.tables, guidance))
            use_user_cache()  # the next process finds this compilation (fastguide.compile_cache)
            compiled = torch.compile(step, fullgraph=True, dynamic=False, mode=mode, backend=backend)
            if backend == "inductor" and self.tables.coefs.device.type == "cpu":
                # on the CPU, dynamo's trace is skipped too by the next process (fastguide.step_store)
                compiled = step_store.stored_or_compiled(step, compiled, args, {"spec": self.spec,
                                                                                "tables": self.tables})
            self.compiled[guidance] = compiled
        return self.compiled[guidance]

    def eager(self, x, index, y, noise, max_label: int | None = None, carry=None, guidance: str = "call",
              model_kwargs=None):  # fmt: skip
        """The step run eagerly; with ``max_label``, the labels are checked against the classifier's logits."""
        out = guided_step(self.spec, self.tables, x, index, y, noise, max_label, carry, guidance, model_kwargs)
        if max_label is not None and guidance == "call":  # the classifier saw the labels (or there is none)
            self.max_label_checked = max(self.max_label_checked, max_label)
        return out

    def index(self, i: int, batch: int) -> torch.Tensor:
        """(batch,) int64 respaced index i on the device, made once per (i, batch)."""
        key = (i, batch)
        if key not in self._indices:
            self._indices[key] = torch.full((batch,), i, dtype=torch.long, device=self.tables.coefs.device)
        return self._indices[key]

    def __call__(self, x, index, y, noise, max_label: int, carry: Carry, guidance: str = "call", model_kwargs=None):
        if self.compiled is None:
            return self.eager(x, index, y, noise, max_label, carry, guidance, model_kwargs)
        if not self.validated or max_label > self.max_label_checked:
            # the checks (output shapes, labels against the logits) run eagerly, with proper errors; their result
            # is dropped: every result of a compiled runner is the compiled step's, whatever ran before it
            self.eager(x, index, y, noise, max_label, carry, guidance, model_kwargs)
            self.validated = True
        try:
            first = guidance not in self.compiled  # compiled by this call: where its caches are found (below)
            with torch._dynamo.config.patch(trace_autograd_ops=True), _cudagraph_skips() as skips, (
                    cacheable_autocast() if first else contextlib.nullcontext()):  # fmt: skip
                args = (x, index, y, noise, carry, model_kwargs)
                out = self._compiled(guidance, args)(*args)  # autograd.grad inside
        except COMPILE_REFUSALS as err:
            reason = " ".join(str(err).split())[:300]
            self.compiled = None
            if (self.spec.classifier is None and self.spec.cond_fn is None) or guidance != "call":
                warnings.warn(f"the guided step cannot be compiled, so it runs eagerly: {reason}", stacklevel=3)
            else:  # the guidance (a custom autograd.Function, a policy's host sync): compile the eps-model alone
                if differentiates_parameters(self.spec.classifier):
                    reason = ("the classifier differentiates the parameters it hands to an autograd.Function of its "
                              "own (as ADM's original gradient checkpoint does), which torch.compile cannot trace")
                warnings.warn(
                    f"the guided step cannot be one compiled graph, so it runs with the eps-model compiled and the "
                    f"rest of the step eagerly: {reason}", stacklevel=3)  # fmt: skip
                self.spec = dataclasses.replace(self.spec, model=CompiledModel(self.spec.model))
            return guided_step(self.spec, self.tables, x, index, y, noise, None, carry, guidance, model_kwargs)
        if self.fast.cuda_graphs and skips and not self.graphs_refused:
            self.graphs_refused = True
            warnings.warn(f"the guided step runs compiled without CUDA graphs: {skips[0]}", stacklevel=3)
        if self.fast.cuda_graphs:  # a replay overwrites its outputs: keep copies
            out = torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
        return out


class CompiledModel:
    """The eps-model's forward compiled alone (the fallback when the whole step cannot be one graph); if it
    cannot be compiled either, it says why once and calls the model as it is."""

    def __init__(self, model: Callable):
        self.model = model
        backend = os.environ.get("FASTGUIDE_COMPILE_BACKEND", "inductor")
        forward = own_code(lambda x, t, **kwargs: model(x, t, **kwargs))
        self.compiled = torch.compile(forward, fullgraph=True, dynamic=False, backend=backend)

    def __call__(self, x, t, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(x, t, **kwargs)
            except COMPILE_REFUSALS as err:
                reason = " ".join(str(err).split())[:300]
                warnings.warn(f"the eps-model cannot be compiled either, so the step runs eagerly: {reason}",
                              stacklevel=4)  # fmt: skip
                self.compiled = None
        return self.model(x, t, **kwargs)


@contextlib.contextmanager
def _cudagraph_skips():
    """The reasons inductor gives, while the block runs, for not capturing a CUDA graph (it then runs the
    compiled code without one). It logs them on its "cudagraphs" artifact logger; this listens there."""
    from torch._inductor.cudagraph_utils import cudagraphs_log

    reasons: list[str] = []

    class Listen(logging.Handler):
        def emit(self, record):
            reasons.append(record.getMessage())

    handler = Listen(logging.WARNING)
    cudagraphs_log.addHandler(handler)
    try:
        yield reasons
    finally:
        cudagraphs_log.removeHandler(handler)


def step_of(spec: StepSpec, tables: StepTables, guidance: str) -> Callable:
    def step(x, index, y, noise, carry, model_kwargs):
        return guided_step(spec, tables, x, index, y, noise, None, carry, guidance, model_kwargs)

    return step


_COMPILED = itertools.count()


def own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. torch.compile caches graphs, and counts recompilations against
    its limit, per code object: without this, every sampler's step would be a recompilation of one function."""
    code = fn.__code__.replace(co_name=f"guided_step_{next(_COMPILED)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
