"""``GuidedSampler``: classifier-guided DDPM/DDIM/DPM-Solver++/UniPC sampling with EDS and the paper's policies.

One step is the data flow of the paper's Fig. 2::

    x_t ─► eps-model(x_t, t) ─► (ε, v)
    x_t ─► classifier(x_t, t) ─► logits ─► ∇x log p(y|x_t), H(p) ─► policy ─► s
    (x_t, ε, v, s·∇, z) ─► guided DDPM/DDIM update ─► x_{t-1}

The respaced chain is walked explicitly: step k uses respaced index ``i = N−1−k``, whose original
timestep ``schedule.timestep_map[i]`` is what both networks see (rescaled to 0..1000 if the schedule
says so). Nothing is hidden in a wrapped model.

This module is the loop (input checks where the values enter, noise, the trace, faults read once after the
loop); the settings are fastguide.config (:class:`SamplerConfig`), one step is fastguide.step with its solver
(fastguide.solvers), and running it compiled or eagerly is fastguide.compiled (:class:`StepRunner`).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Generator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from . import cost, ops
from .compiled import StepRunner
from .config import FastPath, SamplerConfig
from .cpu import flush_denormals
from .diffusion import StepOutput
from .guidance import EntropyDriven, GuidancePolicy, NoGuidance, as_policy
from .noise import FixedNoise, GlobalNoise, PerSampleNoise
from .schedule import Schedule
from .solvers import SOLVERS, Carry
from .step import CHECKS, StepRecord, StepSpec, StepTables, fault_location, first_fault, guided_step, nonfinite_code


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

    def _runner(self, x: torch.Tensor) -> StepRunner:
        """The step for x's device, dtype and shape: made (ops resolved, tables moved, compiled) once, reused."""
        fast = self.fast_path(x.device, x.shape[0])
        key = (x.device, tuple(x.shape), ops.forced_backend(), fast)
        if key not in self._runners:
            tables = StepTables.of(self.schedule, x.device, self.config.method)
            self._runners[key] = StepRunner(self._spec(x, fast), tables, fast)
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


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="sampling", unit="step")
