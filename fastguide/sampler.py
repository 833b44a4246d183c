"""``GuidedSampler``: classifier-guided DDPM/DDIM/DPM-Solver++/UniPC sampling with EDS and the paper's policies.

One step is the data flow of the paper's Fig. 2::

    x_t ─► eps-model(x_t, t) ─► (ε, v)
    x_t ─► classifier(x_t, t) ─► logits ─► ∇x log p(y|x_t), H(p) ─► policy ─► s
    (x_t, ε, v, s·∇, z) ─► guided DDPM/DDIM update ─► x_{t-1}

The respaced chain is walked explicitly: step k uses respaced index ``i = N−1−k``, whose original
timestep ``schedule.timestep_map[i]`` is what both networks see (rescaled to 0..1000 if the schedule
says so). Nothing is hidden in a wrapped model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import logging
import math
import numbers
import os
import types
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from . import cost, ops
from .compile_cache import cacheable_autocast, use_user_cache
from .cpu import flush_denormals, native_bf16
from .diffusion import DDIM_GUIDANCE, VARIANCES, StepOutput
from .classifier import differentiates_parameters
from .guidance import EntropyDriven, GuidancePolicy, NoGuidance, as_policy
from .noise import FixedNoise, GlobalNoise, PerSampleNoise
from .schedule import Schedule
from .solvers import SOLVERS, Carry, names
from .step import (
    CHECKS, StepRecord, StepSpec, StepTables, fault_location, first_fault, guidance_plan,
    guided_step, nonfinite_code,
)  # fmt: skip


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample (everything but the networks, the schedule and the policy)."""

    method: str = "ddim"  # a registered solver (fastguide.solvers.SOLVERS): "ddpm" (ancestral), "ddim",
    # "dpmpp2m" (DPM-Solver++(2M)) or "unipc" (UniPC-bh2)
    eta: float = 0.0  # DDIM stochasticity; 0 = deterministic
    clip_denoised: bool = True  # clip x̂_0 to [-1, 1]
    dynamic_threshold: float | None = None  # dpmpp2m/unipc: threshold x̂0 at this quantile of |x̂0| (Imagen)
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


def _guidance_before(found, records: list[StepRecord]) -> str:
    """For a network's non-finite output at a step after the first: the guidance the step before gave that
    sample (a finite but huge update makes the next network call overflow), or ""."""
    if found is None or found[0] == 0 or CHECKS[found[1]] not in ("eps-model output", "classifier logits"):
        return ""
    before, sample = records[found[0] - 1], found[2]
    if before.scale is None or before.grad_norm is None:
        return ""
    scale, norm = float(before.scale[sample]), float(before.grad_norm[sample])
    if not math.isfinite(norm) or scale * norm < 1e3:  # an ordinary guidance: say nothing of it
        return ""
    return (f"; the step before applied guidance s = {scale:.3g} with ‖s·∇‖ = {scale * norm:.3g} to this sample, which "
            "pushes x_t far out of the networks' range: lower the guidance scale")


def _takes_low_res(net) -> bool:
    """Whether ``net``'s forward takes ``low_res`` (ADM's SuperResModel and its kind)."""
    try:
        return "low_res" in inspect.signature(net.forward if isinstance(net, nn.Module) else net).parameters
    except (TypeError, ValueError):  # no signature to read
        return False


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


class SamplingTrace(NamedTuple):
    """Per-step diagnostics of a run, stacked over steps (first row = first step, the noisiest)."""

    t: torch.Tensor  # (S,) original timestep of each step
    entropy: torch.Tensor | None  # (S, B)
    scale: torch.Tensor | None  # (S, B)
    grad_norm: torch.Tensor | None  # (S, B)
    p_target: torch.Tensor | None  # (S, B)


class SampleResult(NamedTuple):
    images: torch.Tensor  # (B, C, H, W) float32 samples in about [-1, 1]
    labels: torch.Tensor  # (B,) target classes
    trace: SamplingTrace  # per-step diagnostics


def _stack(records: list[StepRecord]) -> SamplingTrace:
    def col(name):
        values = [getattr(r, name) for r in records]
        return None if any(v is None for v in values) else torch.stack(values).cpu()

    return SamplingTrace(torch.stack([r.t[0] for r in records]).cpu(), *(col(n) for n in StepRecord._fields[1:]))


class GuidedSampler:
    """Classifier-guided sampling from an eps-model, with a guidance-scale policy (EDS by default).

    Args:
        model: eps-model ``(x, t, **kw) -> (B, C or 2C, H, W)``; t are original timesteps; class-conditional
            models get ``y=labels``.
        classifier: noise-aware classifier ``(x, t) -> (B, K)`` logits, or None for unguided sampling.
        schedule: the (respaced) chain to walk; see :meth:`Schedule.create`.
        policy: guidance-scale policy (:mod:`fastguide.guidance`), or any ``GuidanceState -> (B,)`` callable.
        config: :class:`SamplerConfig`.
        image_shape: (C, H, W) of the samples; read from ``model.in_channels``/``model.image_size`` if absent.
        num_classes: K; read from ``classifier.out_channels`` or ``model.num_classes`` if absent.
        class_cond: whether ``model`` takes ``y``; read from ``model.num_classes`` if absent.
        cond_fn: instead of a classifier and a policy, ADM's ``cond_fn(x, t, y=) -> s·∇x log p(y|x_t)``
            (t as the networks see it), applied as ADM's loops apply it; for guidance fastguide does not
            compute itself. Prefer :func:`fastguide.adm.cond_fn`, whose classifier and policy run fused.

    Example::

        sampler = GuidedSampler(unet, classifier, Schedule.create("linear", 1000, "ddim25"),
                                EntropyDriven(gamma=4.0))
        result = sampler.sample(labels=[1, 7], seeds=[0, 1])
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
        schedule: Schedule,
        policy: GuidancePolicy | None = None,
        config: SamplerConfig = SamplerConfig(),
        image_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        class_cond: bool | None = None,
        cond_fn: Callable[..., torch.Tensor] | None = None,
    ):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if classifier is not None and not callable(classifier):
            raise TypeError(f"classifier must be callable or None, got {type(classifier).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a fastguide.Schedule, got {type(schedule).__name__}")
        policy = (NoGuidance() if classifier is None else EntropyDriven()) if policy is None else policy
        if not callable(policy):
            raise TypeError(
                f"policy must be a guidance policy such as fastguide.EntropyDriven(gamma=...), got {policy!r}"
            )
        if not isinstance(config, SamplerConfig):
            raise TypeError(f"config must be a fastguide.SamplerConfig, got {type(config).__name__}")
        if cond_fn is not None and (classifier is not None or not isinstance(policy, NoGuidance)):
            raise ValueError("give either cond_fn (ADM's form) or a classifier and a policy, not both")
        if cond_fn is not None and not callable(cond_fn):
            raise TypeError(f"cond_fn must be callable, got {type(cond_fn).__name__}")
        if classifier is None and not isinstance(policy, NoGuidance):
            raise ValueError(f"policy {policy!r} needs a classifier, but classifier is None")
        if (classifier is None or isinstance(policy, NoGuidance)) and (
                config.guidance_interval is not None or config.guidance_every != 1):  # fmt: skip
            raise ValueError(
                f"guidance_interval={config.guidance_interval} / guidance_every={config.guidance_every} need a "
                "classifier and a policy (they say when the classifier is called); this sampler has none")  # fmt: skip
        self.cond_fn = cond_fn
        self.model, self.classifier, self.schedule, self.policy, self.config = (
            model, classifier, schedule, policy, config
        )  # fmt: skip
        self.guided = not isinstance(policy, NoGuidance)
        self._policy = as_policy(policy)  # how the step applies it (fastguide.guidance.Policy)
        self._runners: dict = {}
        self._estimates: dict[torch.device, cost.Estimate | None] = {}  # compile=None's weighing, per device
        self.image_shape = self._image_shape(model, classifier, image_shape)
        self.num_classes = num_classes or getattr(classifier, "out_channels", None) or getattr(
            model, "num_classes", None
        )
        self.model_classes = getattr(model, "num_classes", None)
        self.class_cond = self.model_classes is not None if class_cond is None else class_cond

    @staticmethod
    def _image_shape(model, classifier, image_shape) -> tuple[int, int, int] | None:
        """(C, H, W) from the argument, checked against what the networks declare (in_channels, image_size)."""
        declared = {}
        for name, net in (("model", model), ("classifier", classifier)):
            c, size = getattr(net, "in_channels", None), getattr(net, "image_size", None)
            if isinstance(c, int) and name == "model" and _takes_low_res(net):
                c //= 2  # ADM's SuperResModel: in_channels counts the upsampled low_res it concatenates
            if isinstance(c, int) and isinstance(size, int):
                declared[name] = (c, size, size)
        if image_shape is not None:
            shape = tuple(int(s) for s in image_shape)
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape!r}")
        else:
            shape = next(iter(declared.values()), None)
        for name, expected in declared.items():
            if shape != expected:
                raise ValueError(f"image shape {shape} does not match the {name}'s (in_channels, image_size): {expected}")
        return shape

    # ---- input checks (all before any network call) ----

    def _labels(self, labels, batch: tuple[int, str] | None, device: torch.device) -> torch.Tensor:
        """``labels`` checked, as a tensor on ``device``; ``batch``: (n, what) when ``what`` (the seeds, the
        noise) fixes the number of samples."""
        y = torch.as_tensor(labels)
        if y.numel() == 0:
            raise ValueError(f"labels is empty ({labels!r}): nothing to sample")
        if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"labels must be a 1-D sequence of integer class ids, got {labels!r}")
        if batch is not None and len(y) != batch[0]:
            raise ValueError(f"got {len(y)} labels but {batch[0]} {batch[1]}: give one per label")
        bounds = [k for k in (self.num_classes, self.model_classes if self.class_cond else None) if k]
        for i, label in enumerate(y.tolist()):
            if label < 0:
                raise ValueError(f"class id {label} at position {i} is negative")
            for k in bounds:
                if label >= k:
                    raise ValueError(f"class id {label} at position {i} is out of range for {k} classes")
        return y.to(device=device, dtype=torch.long)

    @staticmethod
    def _model_kwargs(model_kwargs, batch: int, device: torch.device) -> dict[str, torch.Tensor] | None:
        """The eps-model's extra keyword arguments, checked (names, one row per sample) and moved to ``device``."""
        if model_kwargs is None:
            return None
        if not isinstance(model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict of tensors, got {type(model_kwargs).__name__}")
        extra = {}
        for name, value in model_kwargs.items():
            if not isinstance(name, str) or not name.isidentifier() or name == "y":
                raise ValueError(f"model_kwargs name {name!r} is not a keyword argument name other than 'y' "
                                 "(the labels are passed as y)")  # fmt: skip
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"model_kwargs[{name!r}] must be a tensor with one row per sample ({batch}), "
                                 f"got {shape}")  # fmt: skip
            extra[name] = value.to(device)
        return extra or None

    def _noise_source(self, seeds, noise, device):
        if (seeds is None) == (noise is None):
            raise ValueError("give exactly one of seeds (one per sample) or noise (a FixedNoise)")
        if seeds is not None:
            if self.image_shape is None:
                raise ValueError("image_shape is unknown: pass image_shape=(C, H, W) to GuidedSampler")
            return PerSampleNoise(list(seeds), self.image_shape, device)
        if not isinstance(noise, (FixedNoise, PerSampleNoise, GlobalNoise)):
            raise TypeError(f"noise must be a FixedNoise, PerSampleNoise or GlobalNoise, got {type(noise).__name__}")
        if self.image_shape is not None and noise.shape != self.image_shape:
            c, h, w = self.image_shape
            raise ValueError(
                f"noise has image shape {noise.shape}; the model expects {c} channels of {h}x{w}"
            )
        if self.config.draws_noise:
            steps = getattr(noise, "steps", ...)
            if steps is None:
                raise ValueError(f"{self.config.method} with eta={self.config.eta} needs per-step noise")
            if steps is not ... and steps.shape[0] < self.schedule.num_steps:
                raise ValueError(
                    f"step noise has {steps.shape[0]} steps; the schedule has {self.schedule.num_steps}"
                )
        return noise

    def _device(self, device) -> torch.device:
        if device is not None:
            return torch.device(device)
        if isinstance(self.model, nn.Module):
            p = next(self.model.parameters(), None)
            if p is not None:
                return p.device
        return torch.device("cpu")

    # ---- one step ----

    def _t_at(self, step: int) -> int:
        return self.schedule.timestep_map[self.schedule.num_steps - 1 - step]

    def _spec(self, x: torch.Tensor, fast: FastPath) -> StepSpec:
        """The step's static part on x's device: the fused ops resolved once (FASTGUIDE_BACKEND is read here)."""
        cfg = self.config
        b = x.shape[0]
        ones = torch.ones(b, device=x.device)
        coefs = self.schedule.coefficients(torch.zeros(b, dtype=torch.long, device=x.device))
        solver = SOLVERS[cfg.method].from_config(cfg, x, coefs, ones)
        entropy = None
        if self.guided:
            k = self.num_classes or 2
            entropy = ops.resolve("softmax_entropy_scale", torch.zeros(b, k, device=x.device), ones.long())
        return StepSpec(
            model=self.model, classifier=self.classifier if self.guided else None, policy=self._policy,
            num_timesteps=self.schedule.num_original_timesteps, class_cond=self.class_cond, solver=solver,
            check_finite=cfg.check_finite, num_classes=self.num_classes, entropy_op=entropy,
            autocast=fast.autocast, channels_last=fast.channels_last, cond_fn=self.cond_fn,
        )  # fmt: skip

    def fast_path(self, device: torch.device | str, samples: int | None = None) -> FastPath:
        """How this sampler's step runs on ``device`` (:meth:`SamplerConfig.fast_path`), with ``compile=None``
        resolved on the CPU by :mod:`fastguide.cost` for a run of ``config.planned_samples`` samples (else
        ``samples``, else the first call's). Weighed once per device: later calls, whatever their batch, run
        as the first did, so that a sample does not depend on how the run was batched."""
        device = torch.device(device)
        if not self.config.compile_weighed(device):
            return self.config.fast_path(device)
        if device not in self._estimates:
            samples = self.config.planned_samples or samples
            if samples is None:  # not yet weighed, and nothing to weigh: what a run of unknown length gets
                return self.config.fast_path(device)
            self._estimates[device] = self._estimate(device, samples)
        estimate = self._estimates[device]
        return self.config.fast_path(device, repays=estimate is not None and estimate.repays)

    def compile_estimate(self, device: torch.device | str = "cpu", samples: int | None = None) -> cost.Estimate | None:
        """What :mod:`fastguide.cost` expects compiling to save and to cost for a run of ``samples`` samples
        (else ``config.planned_samples``) on ``device``; None where the step cannot be counted."""
        samples = samples or self.config.planned_samples
        if samples is None:
            raise ValueError("compile_estimate needs samples (or config.planned_samples)")
        return self._estimate(torch.device(device), samples)

    def _estimate(self, device: torch.device, samples: int) -> cost.Estimate | None:
        """:func:`fastguide.cost.estimate` of this sampler's steps (counted at batch 1, :func:`~fastguide.cost.step_cost`)."""
        shape = self.image_shape
        if shape is None:  # the networks do not say their image shape: nothing to count
            return None
        with torch.inference_mode(False):
            x = torch.zeros(1, *shape, device=device)
            eager = FastPath(False, False, None, False)
            spec, tables = self._spec(x, eager), StepTables.of(self.schedule, device, self.config.method)
        plan = self.guidance_plan()

        def one_step(action):
            def run():
                with torch.inference_mode(False):
                    x = torch.zeros(1, *shape, device=device)
                    index = torch.full((1,), self.schedule.num_steps - 1, dtype=torch.long, device=device)
                    y = torch.zeros(1, dtype=torch.long, device=device)
                    noise = torch.zeros_like(x) if self.config.draws_noise else None
                    guided_step(spec, tables, x, index, y, noise, None, Carry.zeros(x), action, None)

            return run

        nets = [n for n in (self.model, self.classifier) if n is not None]
        # real tensors where the networks have no state to change (a step more of theirs changes nothing)
        stateless = self.cond_fn is None and all(
            isinstance(n, nn.Module) and not any(m.training for m in n.modules()) for n in nets)  # fmt: skip
        costs = {action: cost.step_cost(one_step(action), fake=not stateless) for action in set(plan)}
        if any(c is None for c in costs.values()):
            return None
        return cost.estimate(costs, plan, samples)

    def _runner(self, x: torch.Tensor) -> _Runner:
        """The step for x's device, dtype and shape: made (ops resolved, tables moved, compiled) once, reused."""
        fast = self.fast_path(x.device, x.shape[0])
        key = (x.device, tuple(x.shape), ops.forced_backend(), fast)
        if key not in self._runners:
            tables = StepTables.of(self.schedule, x.device, self.config.method)
            self._runners[key] = _Runner(self._spec(x, fast), tables, fast)
        return self._runners[key]

    def step(
        self, x: torch.Tensor, index: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None, step: int = 0,
        model_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> tuple[StepOutput, StepRecord]:  # fmt: skip
        """One guided step from respaced indices ``index`` (B,) (samples may sit at different steps), eagerly.

        Returns the update's output and the step's diagnostics; raises FloatingPointError (naming ``step``)
        for a non-finite value, as :meth:`sample` does after its loop. DDPM and DDIM only: a multistep
        solver's step depends on the steps before it (use :meth:`sample` or :meth:`steps`).
        """
        if SOLVERS[self.config.method].multistep:
            raise ValueError(
                f"step() takes one step from any index, which the multistep solver {self.config.method!r} cannot "
                "(it needs the previous steps): use sample() or steps()")  # fmt: skip
        y = y.to(x.device)
        extra = self._model_kwargs(model_kwargs, x.shape[0], x.device)
        out, record, status, _ = self._runner(x).eager(x, index.to(x.device), y, noise, int(y.max()), None, "call",
                                                       extra)  # fmt: skip
        fault = first_fault([status], lambda k, b: int(record.t[b]), first_step=step)
        if fault is not None:
            raise FloatingPointError(fault)
        return out, record

    # ---- the loop ----

    def sample(
        self,
        labels: Sequence[int] | torch.Tensor,
        seeds: Sequence[int] | None = None,
        noise: FixedNoise | PerSampleNoise | GlobalNoise | None = None,
        device: torch.device | str | None = None,
        callback: Callable[[int, StepOutput, StepRecord], None] | None = None,
        model_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> SampleResult:
        """Draw one sample per label.

        Args:
            labels: (B,) target classes (used by the classifier and by a class-conditional model).
            seeds: one seed per sample; sample i depends only on seeds[i] and labels[i].
            noise: instead of seeds, explicit noise (:class:`FixedNoise`: x_T and per-step noise), or
                :class:`GlobalNoise` (torch's global generator, as ADM draws it).
            device: where to sample; defaults to the model's device.
            callback: called after every step as ``callback(k, StepOutput(x_prev, pred_xstart), StepRecord)``.
            model_kwargs: more keyword arguments of the eps-model at every step, tensors with one row per
                sample (ADM's model_kwargs other than y, e.g. a super-resolution model's ``low_res``).
        Returns:
            :class:`SampleResult` with images (B, C, H, W), labels and the per-step trace.
        Raises:
            ValueError: bad labels, seeds, shapes or configuration, before any network call.
            FloatingPointError: a network or the policy produced NaN/inf (names the first step and sample);
                raised after the loop, which runs without host syncs.
        """
        run = self.steps(labels, seeds, noise, device, model_kwargs)
        while True:
            try:
                k, out, record = next(run)
            except StopIteration as done:
                return done.value
            if callback is not None:
                callback(k, out, record)

    def steps(
        self,
        labels: Sequence[int] | torch.Tensor,
        seeds: Sequence[int] | None = None,
        noise: FixedNoise | PerSampleNoise | GlobalNoise | None = None,
        device: torch.device | str | None = None,
        model_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> Generator[tuple[int, StepOutput, StepRecord], None, SampleResult]:
        """:meth:`sample` as a generator: yields ``(k, StepOutput(x_prev, pred_xstart), StepRecord)`` after
        every step and returns the :class:`SampleResult`. Arguments are checked at the first ``next``; a
        non-finite value is raised when the loop ends, as :meth:`sample` raises it."""
        device = self._device(device)
        if seeds is not None and (isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__")):
            raise ValueError(f"seeds must be a sequence with one seed per sample, got {seeds!r}")
        batch = (len(seeds), "seeds") if seeds is not None else ((len(noise), "noise rows") if noise is not None else None)
        y = self._labels(labels, batch, device)
        extra = self._model_kwargs(model_kwargs, len(y), device)
        max_label = int(y.max())  # the labels were checked on the host just before: no extra wait
        source = self._noise_source(seeds, noise, device)
        needs_noise = self.config.draws_noise
        n = self.schedule.num_steps
        plan = self.guidance_plan()
        first_call = plan.index("call")
        records, statuses = [], []
        progress = _progress(n, self.config.progress)
        # the classifier's gradient needs autograd, even inside inference_mode (entered per step: the
        # caller's code between steps runs in its own mode)
        with torch.inference_mode(False):
            x = source.initial().to(device)
            runner = self._runner(x)
            carry = Carry.zeros(x)
        flush = self.config.flush_denormals and device.type == "cpu"
        for k in range(n):  # the caller's code between steps runs in its own float mode
            with torch.inference_mode(False), flush_denormals(flush):
                index = runner.index(n - 1 - k, len(y))
                z = source.step(k).to(device) if needs_noise else None
                # the labels are checked against the classifier's logits at its first call (eagerly)
                check = max_label if k <= first_call else -1
                out, record, status, carry = runner(x, index, y, z, check, carry, plan[k], extra)
            x = out.x_prev
            records.append(record)
            statuses.append(status)
            yield k, out, record
            progress.update(1)
        progress.close()
        fault = first_fault(statuses, lambda k, b: self._t_at(k))
        if fault is not None:
            fault += _guidance_before(fault_location(statuses), records)
        if fault is None and self.config.check_finite:
            fault = first_fault([nonfinite_code(x)[None]], lambda k, b: self._t_at(k), ("sample",), first_step=n - 1)
        if fault is not None:
            raise FloatingPointError(fault)
        trace = _stack(records)
        self._warn_entropy_floor(trace)
        return SampleResult(x, y, trace)

    def guidance_plan(self) -> list[str]:
        """What each step (noisiest first) does with the classifier: "call", "reuse" the last scale and
        gradient, or "off" (:func:`fastguide.step.guidance_plan`, from ``guidance_interval`` and
        ``guidance_every``); all "call" without them or without a classifier."""
        if self.classifier is None:
            return ["call"] * self.schedule.num_steps
        return self.config.guidance_plan(self.schedule)

    def _warn_entropy_floor(self, trace: SamplingTrace) -> None:
        """Once per run, what the policy has to say about the run's trace (EDS: an entropy below its floor)."""
        warning = self._policy.trace_warning(trace)
        if warning is not None:
            warnings.warn(warning, stacklevel=3)


# what tracing or compiling raises when the step cannot be one graph (a graph break in a policy, a backend
# failure); a recompilation refused by error_on_recompile is not among them: it propagates
_COMPILE_REFUSALS = (
    torch._dynamo.exc.Unsupported, torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.UserError,
    torch._dynamo.exc.TorchRuntimeError,
)  # fmt: skip


class _Runner:
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

    def _compiled(self, guidance: str) -> Callable:
        if guidance not in self.compiled:
            mode = "reduce-overhead" if self.fast.cuda_graphs else None
            # FASTGUIDE_COMPILE_BACKEND=aot_eager traces exactly as inductor does, without its code generation
            backend = os.environ.get("FASTGUIDE_COMPILE_BACKEND", "inductor")
            step = _own_code(_step_of(self.spec, self.tables, guidance))
            use_user_cache()  # the next process finds this compilation (fastguide.compile_cache)
            self.compiled[guidance] = torch.compile(step, fullgraph=True, dynamic=False, mode=mode, backend=backend)
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
                out = self._compiled(guidance)(x, index, y, noise, carry, model_kwargs)  # autograd.grad inside
        except _COMPILE_REFUSALS as err:
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
                self.spec = dataclasses.replace(self.spec, model=_CompiledModel(self.spec.model))
            return guided_step(self.spec, self.tables, x, index, y, noise, None, carry, guidance, model_kwargs)
        if self.fast.cuda_graphs and skips and not self.graphs_refused:
            self.graphs_refused = True
            warnings.warn(f"the guided step runs compiled without CUDA graphs: {skips[0]}", stacklevel=3)
        if self.fast.cuda_graphs:  # a replay overwrites its outputs: keep copies
            out = torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
        return out


class _CompiledModel:
    """The eps-model's forward compiled alone (the fallback when the whole step cannot be one graph); if it
    cannot be compiled either, it says why once and calls the model as it is."""

    def __init__(self, model: Callable):
        self.model = model
        backend = os.environ.get("FASTGUIDE_COMPILE_BACKEND", "inductor")
        forward = _own_code(lambda x, t, **kwargs: model(x, t, **kwargs))
        self.compiled = torch.compile(forward, fullgraph=True, dynamic=False, backend=backend)

    def __call__(self, x, t, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(x, t, **kwargs)
            except _COMPILE_REFUSALS as err:
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


def _step_of(spec: StepSpec, tables: StepTables, guidance: str) -> Callable:
    def step(x, index, y, noise, carry, model_kwargs):
        return guided_step(spec, tables, x, index, y, noise, None, carry, guidance, model_kwargs)

    return step


_COMPILED = itertools.count()


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. torch.compile caches graphs, and counts recompilations against
    its limit, per code object: without this, every sampler's step would be a recompilation of one function."""
    code = fn.__code__.replace(co_name=f"guided_step_{next(_COMPILED)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="sampling", unit="step")
