"""How to sample (:class:`SamplerConfig`): everything but the networks, the schedule and the policy, checked
once when it is made; and what its automatic settings resolve to on a device (:class:`FastPath`)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .cpu import native_bf16
from .diffusion import DDIM_GUIDANCE, VARIANCES
from .schedule import Schedule
from .solvers import SOLVERS, names
from .step import guidance_plan


def _number(value, kinds: tuple[type, ...] = (int, float)) -> bool:
    """``value`` is one of ``kinds`` and not a bool (which is an int to isinstance)."""
    return isinstance(value, kinds) and not isinstance(value, (bool, np.bool_))


PRECISIONS = {"auto": None, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FastPath(NamedTuple):
    """How the step runs (SamplerConfig.fast_path): what the automatic settings resolved to on a device."""

    compile: bool  # torch.compile of the whole step
    cuda_graphs: bool  # CUDA-graph replay of the compiled step
    autocast: torch.dtype | None  # the networks under autocast to this dtype (None: float32)
    channels_last: bool  # channels-last images for the networks


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample (everything but the networks, the schedule and the policy)."""

    method: str = "ddim"  # a registered solver (fastguide.solvers.SOLVERS): "ddpm" (ancestral), "ddim",
    # "dpmpp2m" (DPM-Solver++(2M)) or "unipc" (UniPC-bh2)
    eta: float = 0.0  # DDIM stochasticity; 0 = deterministic
    clip_denoised: bool = True  # clip x̂_0 to [-1, 1]
    dynamic_threshold: float | None = None  # multistep solvers: threshold x̂0 at this quantile of |x̂0| (Imagen)
    threshold_max: float = 1.5  # the largest dynamic threshold (it is clamped to [1, threshold_max])
    guidance_interval: tuple[int, int] | None = None  # call the classifier only at original t in [lo, hi]
    guidance_every: int = 1  # call it at every k-th of those steps, reusing the last scale and gradient between
    variance: str = "auto"  # DDPM variance: auto | learned_range | learned | fixed_small | fixed_large
    ddim_guidance: str = "adm"  # "adm": ε − sqrt(1−ᾱ)·s∇ (ADM, EDS release); "paper": ε − s∇ (Alg. 1)
    check_finite: bool = True  # raise on NaN/inf from the networks (read once, after the loop); scales always
    progress: bool = False  # show a progress bar
    compile: bool | None = None  # the whole step in one torch.compile region; None: on CUDA, and on a CPU with
    # native bf16 for a run long enough to repay a cold compile (fastguide.cost, planned_samples), else eager
    cuda_graphs: bool | None = None  # replay the compiled step as a CUDA graph; None: with compile on CUDA
    precision: str = "auto"  # the networks' precision: auto, float32, bfloat16, float16 (auto: bfloat16 on
    # CUDA and on a CPU with native bf16, AMX-BF16 or AVX512-BF16 (fastguide.cpu.bf16_kind), float32 elsewhere)
    channels_last: bool | None = None  # channels-last images for the networks; None: on CUDA, off on CPU
    flush_denormals: bool = True  # on the CPU, each step treats denormal floats as zero (restored between steps)
    planned_samples: int | None = None  # how many samples the sampler will draw in all, over all its calls:
    # the run length compile=None weighs on the CPU; None: the first call's samples

    def __post_init__(self):
        if self.method not in SOLVERS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {tuple(SOLVERS)}")
        solver = SOLVERS[self.method]
        # a string such as "no" or "False" is truthy
        for name in ("clip_denoised", "check_finite", "progress", "flush_denormals"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))
        if not _number(self.eta, (numbers.Real,)) or not (math.isfinite(self.eta) and 0 <= self.eta <= 1):
            # eta > 1 makes 1 − ᾱ_{t−1} − σ² negative in the DDIM update
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        if self.eta != 0 and not solver.takes_eta:
            takers = " or ".join(map(repr, names(takes_eta=True)))
            raise ValueError(f"eta={self.eta!r} applies to method {takers} only, not {self.method!r}")
        if self.dynamic_threshold is not None:
            if not solver.takes_threshold:
                raise ValueError(f"dynamic_threshold applies to {names(takes_threshold=True)}, not method "
                                 f"{self.method!r}")  # fmt: skip
            if not (_number(self.dynamic_threshold) and 0 < self.dynamic_threshold <= 1):
                raise ValueError(f"dynamic_threshold must be a quantile in (0, 1], got {self.dynamic_threshold!r}")
            if not self.clip_denoised:
                raise ValueError("dynamic_threshold replaces clipping x̂0; it cannot go with clip_denoised=False")
        if not (_number(self.threshold_max) and math.isfinite(self.threshold_max) and self.threshold_max >= 1):
            raise ValueError(f"threshold_max must be a finite number >= 1, got {self.threshold_max!r}")
        if self.threshold_max != 1.5 and self.dynamic_threshold is None:
            raise ValueError(f"threshold_max={self.threshold_max!r} applies only with dynamic_threshold")
        if self.guidance_interval is not None:
            lo_hi = tuple(self.guidance_interval)
            if len(lo_hi) != 2 or not all(_number(v, (int,)) for v in lo_hi) or not (
                    0 <= lo_hi[0] <= lo_hi[1]):  # fmt: skip
                raise ValueError(
                    f"guidance_interval must be two original timesteps (lo, hi) with 0 <= lo <= hi, got "
                    f"{self.guidance_interval!r}")  # fmt: skip
            object.__setattr__(self, "guidance_interval", lo_hi)
        if not (_number(self.guidance_every, (int,)) and self.guidance_every >= 1):
            raise ValueError(f"guidance_every must be an integer >= 1, got {self.guidance_every!r}")
        if self.variance != "auto" and self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; expected 'auto' or one of {VARIANCES}")
        if self.ddim_guidance not in DDIM_GUIDANCE:
            raise ValueError(f"unknown ddim_guidance {self.ddim_guidance!r}; expected one of {DDIM_GUIDANCE}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {sorted(PRECISIONS)}")
        if self.planned_samples is not None and not (_number(self.planned_samples, (int,)) and self.planned_samples >= 1):
            raise ValueError(f"planned_samples must be a positive integer or None, got {self.planned_samples!r}")
        for name in ("compile", "cuda_graphs", "channels_last"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name} must be True, False or None (automatic), got {getattr(self, name)!r}")

    @property
    def draws_noise(self) -> bool:
        """Whether a step takes fresh noise (the solver's :meth:`~fastguide.solvers.Solver.draws_noise`: DDPM,
        and DDIM with eta > 0)."""
        return SOLVERS[self.method].draws_noise(self)

    def guidance_plan(self, schedule: Schedule) -> list[str]:
        """What each step of ``schedule`` (noisiest first) does with the classifier, from
        ``guidance_interval`` and ``guidance_every`` (:func:`fastguide.step.guidance_plan`).

        Raises:
            ValueError: the interval holds none of the chain's timesteps (the classifier would never be called).
        """
        timesteps = list(reversed(schedule.timestep_map))
        plan = guidance_plan(timesteps, self.guidance_interval, self.guidance_every)
        if "call" not in plan:
            raise ValueError(
                f"guidance_interval {self.guidance_interval} contains none of the chain's timesteps "
                f"({timesteps[-1]}..{timesteps[0]}): the classifier would never be called")  # fmt: skip
        return plan

    def fast_path(self, device: torch.device, repays: bool = False) -> FastPath:
        """The compile, CUDA-graph, precision and memory-format choices on ``device``, automatic ones resolved:
        on CUDA everything on and bfloat16 networks; on the CPU bfloat16 networks where the CPU computes bf16
        natively and float32 elsewhere, where bf16 is emulated and slower (:func:`fastguide.cpu.bf16_kind`),
        and eager unless the networks run in bf16 on such a CPU and ``repays`` says that the run repays a cold
        compile (the sampler's estimate, :meth:`GuidedSampler.fast_path`, :mod:`fastguide.cost`)."""
        cuda = device.type == "cuda"
        precision = self._precision(device)
        compile_ = self.compile
        if compile_ is None:
            compile_ = cuda or (repays and self.compile_weighed(device))
        graphs = (cuda and compile_) if self.cuda_graphs is None else self.cuda_graphs
        if graphs and not cuda:
            raise ValueError(f"cuda_graphs=True needs a CUDA device, got {device}")
        channels_last = cuda if self.channels_last is None else self.channels_last
        return FastPath(compile_, graphs, PRECISIONS[precision], channels_last)

    def compile_weighed(self, device: torch.device) -> bool:
        """Whether ``compile=None`` on ``device`` weighs the run's length (:mod:`fastguide.cost`): on a CPU with
        native bf16 whose networks run in bf16, the case its constants were measured for."""
        return (self.compile is None and device.type == "cpu" and native_bf16()
                and self._precision(device) == "bfloat16")  # fmt: skip

    def _precision(self, device: torch.device) -> str:
        """``precision`` with "auto" resolved on ``device``."""
        if self.precision != "auto":
            return self.precision
        return "bfloat16" if device.type == "cuda" or (device.type == "cpu" and native_bf16()) else "float32"
