"""The protocol every solver follows, and the registry the rest of fastguide reads its names from.

A solver is a frozen dataclass of Python scalars and resolved ops (no tensors: dynamo guards on it as a
constant, so a compiled step stays one graph). Its class says what it is (:attr:`Solver.name`, its label,
whether it is multistep, which settings it takes, its default respacing); an instance, made once per
sampler by :meth:`Solver.from_config`, holds the settings and the ops it dispatches to. The step
(:func:`fastguide.step.guided_step`) runs the networks and the guidance, then hands the solver one
:class:`StepInputs` and the :class:`Carry`, and takes back (x_{t−1}, x̂0, carry).

Adding a solver is one module: subclass :class:`Solver` (or :class:`~fastguide.solvers.multistep.Multistep`),
decorate it with :func:`register`, and import it in ``fastguide/solvers/__init__.py``. The sampler's
checks, the command lines' choices, adm-sample, reproduce and the default respacings follow the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from ..schedule import Schedule

SOLVERS: dict[str, type[Solver]] = {}  # name -> class, in the order the modules register them


def register(cls: type[Solver]) -> type[Solver]:
    """Class decorator: add a solver to :data:`SOLVERS` under its name."""
    if cls.name in SOLVERS:
        raise ValueError(f"a solver named {cls.name!r} is registered already ({SOLVERS[cls.name].__qualname__})")
    SOLVERS[cls.name] = cls
    return cls


def names(**flags: bool) -> tuple[str, ...]:
    """The registered names whose class attributes have the given values, e.g. ``names(multistep=True)``."""
    return tuple(n for n, cls in SOLVERS.items() if all(getattr(cls, k) == v for k, v in flags.items()))


class Carry(NamedTuple):
    """What a step hands to the next: the multistep solvers' history and the last guidance (all (B, ...))."""

    d1: torch.Tensor  # x̂0 of the previous step
    d2: torch.Tensor  # x̂0 of the step before it (UniPC's second-order corrector)
    x_last: torch.Tensor  # the previous step's (corrected) sample (UniPC)
    scale: torch.Tensor  # (B,) the last guidance scale the classifier gave
    grad: torch.Tensor  # the last classifier gradient ∇x log p(y|x_t)

    @classmethod
    def zeros(cls, x: torch.Tensor) -> Carry:
        # distinct tensors: a compiled step is traced for unaliased inputs
        zero = [torch.zeros_like(x) for _ in range(4)]
        return cls(zero[0], zero[1], zero[2], torch.zeros(x.shape[0], device=x.device), zero[3])


class StepInputs(NamedTuple):
    """What a step hands its solver, all float32 and per sample (a pytree, so dynamo traces through it)."""

    x: torch.Tensor  # (B, C, H, W) x_t
    eps: torch.Tensor  # (B, C, H, W) the eps-model's ε (unguided)
    v: torch.Tensor | None  # (B, C, H, W) its variance channels, or None (C outputs)
    grad: torch.Tensor | None  # ∇x log p(y|x_t), or None: no guidance at this step
    scale: torch.Tensor | None  # (B,) the guidance scale s, or None with grad
    noise: torch.Tensor | None  # (B, C, H, W) standard normal z where the solver draws noise, else None
    coefs: torch.Tensor  # (B, NUM_COEFS) Schedule.coefficients rows at the step's indices
    row: torch.Tensor | None  # (B, F) rows of the solver's own table (Solver.table) at the indices, or None
    nonzero: torch.Tensor  # (B,) 0.0 where the index is 0 (the last step), else 1.0


@dataclass(frozen=True, eq=False)
class Solver:
    """A sampling method: its settings, the ops it resolved, and one step from :class:`StepInputs`."""

    name: ClassVar[str]  # its key in SOLVERS and its SamplerConfig.method / --method value
    label: ClassVar[str]  # how help texts, plots and tables call it ("DPM-Solver++(2M)")
    default_respacing: ClassVar[str]  # the respacing the command lines use unless told
    quick_respacing: ClassVar[str]  # the respacing of `fastguide reproduce --quick`
    multistep: ClassVar[bool] = False  # a step needs the steps before it: GuidedSampler.step() refuses it
    takes_eta: ClassVar[bool] = False  # SamplerConfig.eta may be nonzero
    takes_threshold: ClassVar[bool] = False  # SamplerConfig.dynamic_threshold may be given

    clip_denoised: bool = True  # clip x̂0 to [−1, 1]

    @classmethod
    def draws_noise(cls, config) -> bool:
        """Whether each step takes fresh standard normal noise with these settings (a SamplerConfig)."""
        return False

    @classmethod
    def from_config(cls, config, x: torch.Tensor, coefs: torch.Tensor, ones: torch.Tensor) -> Solver:
        """The solver for ``config``, with its ops resolved for tensors like x (B, C, H, W), ``coefs``
        (B, NUM_COEFS) and ``ones`` (B,) on their device (fastguide.ops reads FASTGUIDE_BACKEND here)."""
        raise NotImplementedError

    @classmethod
    def table(cls, schedule: Schedule) -> torch.Tensor | None:
        """(N, F) float32 rows of the solver's own coefficients by respaced index (made in float64), or None."""
        return None

    def step(self, inp: StepInputs, carry: Carry) -> tuple[torch.Tensor, torch.Tensor, Carry]:
        """(x_{t−1}, x̂0, the carry for the next step) from one step's inputs; no host syncs, no Python
        branch on a tensor's value."""
        raise NotImplementedError
