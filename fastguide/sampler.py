"""``GuidedSampler``: classifier-guided DDPM/DDIM sampling with EDS and the paper's ablation policies.

One step is the data flow of the paper's Fig. 2::

    x_t ─► eps-model(x_t, t) ─► (ε, v)
    x_t ─► classifier(x_t, t) ─► logits ─► ∇x log p(y|x_t), H(p) ─► policy ─► s
    (x_t, ε, v, s·∇, z) ─► guided DDPM/DDIM update ─► x_{t-1}

The respaced chain is walked explicitly: step k uses respaced index ``i = N−1−k``, whose original
timestep ``schedule.timestep_map[i]`` is what both networks see (rescaled to 0..1000 if the schedule
says so). Nothing is hidden in a wrapped model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from . import ops
from .diffusion import DDIM_GUIDANCE, VARIANCES, StepOutput
from .kernels.reference import VARIANCE_CODES
from .guidance import ClassifierOutput, EntropyDriven, GuidancePolicy, NoGuidance, classifier_gradient, guidance_state
from .noise import FixedNoise, PerSampleNoise
from .schedule import Schedule

METHODS = ("ddpm", "ddim")


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample (everything but the networks, the schedule and the policy)."""

    method: str = "ddim"  # "ddpm" (ancestral) or "ddim"
    eta: float = 0.0  # DDIM stochasticity; 0 = deterministic
    clip_denoised: bool = True  # clip x̂_0 to [-1, 1]
    variance: str = "auto"  # DDPM variance: auto | learned_range | learned | fixed_small | fixed_large
    ddim_guidance: str = "adm"  # "adm": ε − sqrt(1−ᾱ)·s∇ (ADM, EDS release); "paper": ε − s∇ (Alg. 1)
    check_finite: bool = True  # raise on NaN/inf from the networks (a host sync per check); scales are always checked
    progress: bool = False  # show a progress bar

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if not (math.isfinite(self.eta) and 0 <= self.eta <= 1):
            # eta > 1 makes 1 − ᾱ_{t−1} − σ² negative in the DDIM update
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        if self.variance != "auto" and self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; expected 'auto' or one of {VARIANCES}")
        if self.ddim_guidance not in DDIM_GUIDANCE:
            raise ValueError(f"unknown ddim_guidance {self.ddim_guidance!r}; expected one of {DDIM_GUIDANCE}")


class StepRecord(NamedTuple):
    """Diagnostics of one step, per sample (None where no classifier was called)."""

    t: torch.Tensor  # (B,) original timesteps
    entropy: torch.Tensor | None  # (B,) H(p(ỹ|x_t)) in nats
    scale: torch.Tensor | None  # (B,) guidance scale s
    grad_norm: torch.Tensor | None  # (B,) ‖∇x log p(y|x_t)‖₂, before scaling
    p_target: torch.Tensor | None  # (B,) p(y|x_t) of the target class


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


def _first_bad_sample(value: torch.Tensor) -> int | None:
    """Index of the first sample with a NaN or +-inf, or None (one host sync)."""
    finite = torch.isfinite(value.reshape(value.shape[0], -1)).all(dim=1)
    if bool(finite.all()):
        return None
    return int((~finite).nonzero()[0, 0])


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
        if classifier is None and not isinstance(policy, NoGuidance):
            raise ValueError(f"policy {policy!r} needs a classifier, but classifier is None")
        self.model, self.classifier, self.schedule, self.policy, self.config = (
            model, classifier, schedule, policy, config
        )  # fmt: skip
        self.guided = not isinstance(policy, NoGuidance)
        self._floor_warned = False
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

    def _labels(self, labels, batch: int | None, device: torch.device) -> torch.Tensor:
        y = torch.as_tensor(labels)
        if y.numel() == 0:
            raise ValueError(f"labels is empty ({labels!r}): nothing to sample")
        if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"labels must be a 1-D sequence of integer class ids, got {labels!r}")
        if batch is not None and len(y) != batch:
            raise ValueError(f"got {len(y)} labels for a batch of {batch} samples")
        bounds = [k for k in (self.num_classes, self.model_classes if self.class_cond else None) if k]
        for i, label in enumerate(y.tolist()):
            if label < 0:
                raise ValueError(f"class id {label} at position {i} is negative")
            for k in bounds:
                if label >= k:
                    raise ValueError(f"class id {label} at position {i} is out of range for {k} classes")
        return y.to(device=device, dtype=torch.long)

    def _noise_source(self, seeds, noise, device):
        if (seeds is None) == (noise is None):
            raise ValueError("give exactly one of seeds (one per sample) or noise (a FixedNoise)")
        if seeds is not None:
            if self.image_shape is None:
                raise ValueError("image_shape is unknown: pass image_shape=(C, H, W) to GuidedSampler")
            return PerSampleNoise(list(seeds), self.image_shape, device)
        if not isinstance(noise, (FixedNoise, PerSampleNoise)):
            raise TypeError(f"noise must be a FixedNoise or PerSampleNoise, got {type(noise).__name__}")
        if self.image_shape is not None and noise.shape != self.image_shape:
            c, h, w = self.image_shape
            raise ValueError(
                f"noise has image shape {noise.shape}; the model expects {c} channels of {h}x{w}"
            )
        if self.config.method == "ddpm" or self.config.eta > 0:
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

    def _eps_and_v(self, x: torch.Tensor, t_model: torch.Tensor, y: torch.Tensor, step: int):
        kwargs = {"y": y} if self.class_cond else {}
        with torch.no_grad():
            out = self.model(x, t_model, **kwargs)
        b, c = x.shape[:2]
        if out.dim() != 4 or out.shape[0] != b or out.shape[1] not in (c, 2 * c) or out.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"eps-model returned shape {tuple(out.shape)} for input {tuple(x.shape)}; "
                f"expected ({b}, {c} or {2 * c}, {x.shape[2]}, {x.shape[3]})"
            )
        self._check("eps-model output", out, step)
        out = out.float()
        return (out, None) if out.shape[1] == c else torch.split(out, c, dim=1)

    def _check(self, what: str, value: torch.Tensor, step: int, always: bool = False) -> None:
        if not (self.config.check_finite or always):
            return
        bad = _first_bad_sample(value)
        if bad is not None:
            v = value[bad].reshape(-1)
            v = v[~torch.isfinite(v)][0].item()
            raise FloatingPointError(f"{what} is {v} for sample {bad} at step {step} (t={self._t_at(step)})")

    def _t_at(self, step: int) -> int:
        return self.schedule.timestep_map[self.schedule.num_steps - 1 - step]

    def _check_logits(self, logits: torch.Tensor, step: int) -> None:
        """Every sample's logits define p(y|x_t): no NaN, no +inf, and some class above −inf (a class at −inf
        alone is allowed: p = 0). Else a FloatingPointError that names the classifier, the sample and the step."""
        ok = ~(logits.isnan() | (logits == math.inf)).any(dim=1) & (logits > -math.inf).any(dim=1)
        if bool(ok.all()):
            return
        bad = int((~ok).nonzero()[0, 0])
        row = logits[bad]
        cause = "nan" if row.isnan().any() else "inf" if (row == math.inf).any() else "-inf for every class"
        raise FloatingPointError(
            f"classifier logits are {cause} for sample {bad} at step {step} (t={self._t_at(step)}): "
            "p(y|x_t), its entropy and the guidance scale are undefined"
        )

    def _guidance(self, x, t_model, t_orig, y, step):
        """(raw gradient, scale, record); gradient and scale are None when guidance is off."""
        if not self.guided:
            return None, None, StepRecord(t_orig, None, None, None, None)
        out: ClassifierOutput = classifier_gradient(self.classifier, x, t_model, y)
        if self.num_classes is not None and out.logits.shape[1] != self.num_classes:
            raise ValueError(f"classifier returned {out.logits.shape[1]} logits; expected {self.num_classes}")
        if self.config.check_finite:
            self._check_logits(out.logits, step)
        state = guidance_state(out, t_orig, self.schedule.num_original_timesteps)
        scale = torch.as_tensor(self.policy(state), dtype=torch.float32, device=x.device).detach()
        if scale.shape != (x.shape[0],):
            raise ValueError(f"policy returned a scale of shape {tuple(scale.shape)}; expected ({x.shape[0]},)")
        if _first_bad_sample(scale) is not None:  # the classifier's fault, or else the policy's
            self._check_logits(out.logits, step)
            self._check("guidance scale", scale, step, always=True)
        self._warn_entropy_floor(state, step)
        self._check("classifier gradient", out.grad, step)
        return out.grad, scale, StepRecord(t_orig, out.entropy, scale, state.grad_norm, out.log_prob.exp())

    def _warn_entropy_floor(self, state, step: int) -> None:
        floor = getattr(self.policy, "entropy_floor", None)
        if floor is None or self._floor_warned:
            return
        low = state.entropy < floor
        if bool(low.any()):
            self._floor_warned = True
            i = int(low.nonzero()[0, 0])
            warnings.warn(
                f"entropy of sample {i} at step {step} is {state.entropy[i].item():.3g} nats, below the EDS floor "
                f"{floor:g}: its scale is gamma*log(K)/floor; consider EntropyDriven(max_scale=...)",
                stacklevel=3,
            )

    def step(
        self, x: torch.Tensor, index: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None, step: int = 0
    ) -> tuple[StepOutput, StepRecord]:
        """One guided step from respaced indices ``index`` (B,) (samples may sit at different steps).

        Returns the update's output and the step's diagnostics.
        """
        t_model = self.schedule.model_timesteps(index)
        t_orig = self.schedule.original_timesteps(index)
        eps, v = self._eps_and_v(x, t_model, y, step)
        grad, scale, record = self._guidance(x, t_model, t_orig, y, step)
        coefs = self.schedule.coefficient_matrix(index)
        nonzero = (index != 0).float()
        cfg = self.config
        if cfg.method == "ddim":
            x_prev, xstart = ops.guided_ddim_update(
                x, eps, grad, scale, noise, coefs, nonzero, cfg.eta, cfg.clip_denoised, cfg.ddim_guidance == "paper"
            )
        else:
            variance = cfg.variance if cfg.variance != "auto" else ("fixed_large" if v is None else "learned_range")
            if variance.startswith("learned") and v is None:
                raise ValueError(f"variance {variance!r} needs a model with 2C output channels (eps and v)")
            x_prev, xstart = ops.guided_ddpm_update(
                x, eps, v, grad, scale, noise, coefs, nonzero, VARIANCE_CODES[variance], cfg.clip_denoised
            )
        return StepOutput(x_prev, xstart), record

    # ---- the loop ----

    def sample(
        self,
        labels: Sequence[int] | torch.Tensor,
        seeds: Sequence[int] | None = None,
        noise: FixedNoise | PerSampleNoise | None = None,
        device: torch.device | str | None = None,
        callback: Callable[[int, StepOutput, StepRecord], None] | None = None,
    ) -> SampleResult:
        """Draw one sample per label.

        Args:
            labels: (B,) target classes (used by the classifier and by a class-conditional model).
            seeds: one seed per sample; sample i depends only on seeds[i] and labels[i].
            noise: instead of seeds, explicit noise (:class:`FixedNoise`: x_T and per-step noise).
            device: where to sample; defaults to the model's device.
            callback: called after every step as ``callback(k, StepOutput(x_prev, pred_xstart), StepRecord)``.
        Returns:
            :class:`SampleResult` with images (B, C, H, W), labels and the per-step trace.
        Raises:
            ValueError: bad labels, seeds, shapes or configuration, before any network call.
            FloatingPointError: a network or the policy produced NaN/inf (names step and sample).
        """
        device = self._device(device)
        if seeds is not None and (isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__")):
            raise ValueError(f"seeds must be a sequence with one seed per sample, got {seeds!r}")
        batch = len(seeds) if seeds is not None else (len(noise) if noise is not None else None)
        self._floor_warned = False
        y = self._labels(labels, batch, device)
        source = self._noise_source(seeds, noise, device)
        needs_noise = self.config.method == "ddpm" or self.config.eta > 0
        x = source.initial().to(device)
        records = []
        n = self.schedule.num_steps
        progress = _progress(n, self.config.progress)
        for k in range(n):
            index = torch.full((len(y),), n - 1 - k, device=device, dtype=torch.long)
            z = source.step(k).to(device) if needs_noise else None
            out, record = self.step(x, index, y, z, step=k)
            x = out.x_prev
            records.append(record)
            if callback is not None:
                callback(k, out, record)
            progress.update(1)
        progress.close()
        self._check("sample", x, n - 1)
        return SampleResult(x, y, _stack(records))


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="sampling", unit="step")
