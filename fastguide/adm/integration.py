"""fastguide inside an ADM (openai/guided-diffusion) codebase.

Two ways in, each one line:

* **EDS in ADM's own loops**: pass ``cond_fn=eds_cond_fn(classifier, gamma)`` (or :func:`cond_fn` with
  any fastguide policy) to ADM's ``p_sample_loop`` / ``ddim_sample_loop``. It has ADM's cond_fn
  signature ``(x, t, y=None, **kw) -> s·∇x log p(y|x_t)`` and computes the gradient, the entropy and the
  scale as fastguide's sampler does (one fused softmax–entropy–scale pass seeding the backward).
* **fastguide's loop behind ADM's interface**: ``diffusion = accelerate(diffusion)``. The result has
  ADM's ``p_sample_loop``, ``ddim_sample_loop`` and their ``_progressive`` forms with ADM's arguments and
  return values, running :class:`~fastguide.GuidedSampler` (and its compiled step where the config asks
  for it); every other attribute (training losses, ``q_sample``, ...) is the wrapped object's own.

The diffusion object is read duck-typed (betas, timestep map, variance and mean type, rescale_timesteps):
nothing here imports guided_diffusion.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..classifier import check_labels, classifier_pass
from ..diffusion import XStartToEps
from ..guidance import Constant, EntropyDriven, GuidancePolicy, GuidanceState, NoGuidance, as_policy, policy_scale
from ..noise import GlobalNoise
from ..config import SamplerConfig
from ..sampler import GuidedSampler
from ..schedule import Schedule
from ..step import StepRecord

# ADM's ModelVarType names -> fastguide's DDPM variances
_VARIANCES = {
    "LEARNED_RANGE": "learned_range", "LEARNED": "learned", "FIXED_SMALL": "fixed_small", "FIXED_LARGE": "fixed_large",
}  # fmt: skip


class CondFn:
    """ADM's ``cond_fn`` computed by fastguide: ``(x, t, y=None, **kw) -> s·∇x log p(y|x_t)`` with the scale
    ``s`` of a fastguide policy (EDS: ``γ·log K / H`` per sample). Build with :func:`cond_fn` or
    :func:`eds_cond_fn`.

    ``t`` is what ADM hands a cond_fn: the original timestep, rescaled to 0..1000 when the diffusion
    object has ``rescale_timesteps`` (the policies see original timesteps either way). With
    ``record=True`` every call's :class:`~fastguide.StepRecord` (t, entropy, scale, ‖∇‖, p(y)) is
    appended to ``records``; ``last`` always holds the latest.
    """

    def __init__(self, classifier: Callable, policy: GuidancePolicy, num_timesteps: int = 1000,
                 rescale_timesteps: bool = False, record: bool = False):  # fmt: skip
        if not callable(classifier):
            raise TypeError(f"classifier must be callable, got {type(classifier).__name__}")
        if not callable(policy) or isinstance(policy, NoGuidance):
            raise ValueError(f"policy must be a guidance policy such as EntropyDriven(gamma=...), got {policy!r}")
        self.classifier, self.policy = classifier, policy
        self.num_timesteps, self.rescale_timesteps = int(num_timesteps), bool(rescale_timesteps)
        self.record, self.records, self.last = record, [], None
        self._policy = as_policy(policy)

    def original_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original timesteps (int64) of what ADM passes as ``t``."""
        if self.rescale_timesteps:
            return torch.round(t.double() * (self.num_timesteps / 1000.0)).long()
        return t.long()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if y is None:
            raise ValueError("cond_fn needs the target classes: ADM passes them as model_kwargs={'y': classes}")
        y = y.to(x.device).long().reshape(-1)
        if len(y) != x.shape[0]:
            raise ValueError(f"got {len(y)} target classes for a batch of {x.shape[0]}")
        if int(y.min()) < 0:
            raise ValueError(f"class id {int(y.min())} is negative")
        t_orig = self.original_timesteps(t)
        max_label = int(y.max())
        with torch.inference_mode(False):  # the fused op dispatched at each call, as ADM's loops run eagerly
            out = classifier_pass(self.classifier, x.float(), t, y, scale_args=self._policy.scale_args(),
                                  check=functools.partial(check_labels, max_label))  # fmt: skip
            scale = policy_scale(self._policy, out, GuidanceState.of(out, t_orig, self.num_timesteps))
        self.last = StepRecord(t_orig, out.entropy, scale, out.grad_norm, out.log_prob.exp())
        if self.record:
            self.records.append(self.last)
        return (out.grad.float() * scale.view(-1, 1, 1, 1)).to(x.dtype)


def _timesteps_of(diffusion) -> tuple[int, bool]:
    """(T of the original chain, rescale_timesteps) of an ADM diffusion object."""
    return int(getattr(diffusion, "original_num_steps", len(diffusion.betas))), bool(diffusion.rescale_timesteps)


def cond_fn(classifier: Callable, policy: GuidancePolicy | float, diffusion=None, *, num_timesteps: int = 1000,
            rescale_timesteps: bool = False, record: bool = False) -> CondFn:  # fmt: skip
    """ADM's cond_fn for ``classifier`` guided by a fastguide ``policy`` (a number is ADM's constant
    ``--classifier_scale``). Give the ``diffusion`` object (or ``num_timesteps``/``rescale_timesteps``)
    when it rescales timesteps or has another T than 1000.

    Example (ADM's scripts/classifier_sample.py, one line changed)::

        cond_fn = fastguide.adm.eds_cond_fn(classifier, gamma=args.classifier_scale, diffusion=diffusion)
        sample = diffusion.p_sample_loop(model_fn, shape, cond_fn=cond_fn, model_kwargs={"y": classes})
    """
    if isinstance(policy, numbers.Real) and not isinstance(policy, bool):
        policy = Constant(float(policy))
    if diffusion is not None:
        num_timesteps, rescale_timesteps = _timesteps_of(diffusion)
    return CondFn(classifier, policy, num_timesteps, rescale_timesteps, record)


def eds_cond_fn(classifier: Callable, gamma: float = 1.0, diffusion=None, **kwargs) -> CondFn:
    """ADM's cond_fn with EDS: ``s = γ · log K / H(p(y|x_t))`` per sample (the paper's Eq. 10, its release's
    ``--use_entropy_scale``). Other keywords: :func:`cond_fn`'s, and EntropyDriven's ``entropy_floor``,
    ``max_scale``."""
    eds = {k: kwargs.pop(k) for k in ("entropy_floor", "max_scale") if k in kwargs}
    return cond_fn(classifier, EntropyDriven(gamma, **eds), diffusion, **kwargs)


class AcceleratedDiffusion:
    """An ADM diffusion object whose sampling loops run fastguide's sampler (see :func:`accelerate`)."""

    def __init__(self, diffusion, config: SamplerConfig | None = None):
        mean = getattr(getattr(diffusion, "model_mean_type", None), "name", "EPSILON")
        if mean not in ("EPSILON", "START_X"):
            raise ValueError(f"model_mean_type {mean}: fastguide samples eps- and x0-prediction models "
                             "(EPSILON, START_X) only")  # fmt: skip
        var = getattr(getattr(diffusion, "model_var_type", None), "name", "FIXED_LARGE")
        if var not in _VARIANCES:
            raise ValueError(f"unknown model_var_type {var!r}; expected one of {sorted(_VARIANCES)}")
        if config is not None and not isinstance(config, SamplerConfig):
            raise TypeError(f"config must be a fastguide.SamplerConfig, got {type(config).__name__}")
        self.diffusion, self.variance = diffusion, _VARIANCES[var]
        self.schedule = Schedule.from_adm(diffusion)
        self.predict_xstart = mean == "START_X"
        self.config = config or SamplerConfig()
        self._samplers: dict = {}

    def __getattr__(self, name):  # everything but the sampling loops is the wrapped object's
        if name == "diffusion":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.diffusion, name)

    def __repr__(self) -> str:
        return f"accelerate({self.diffusion!r})"

    # ---- ADM's loops ----

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False) -> torch.Tensor:  # fmt: skip
        """ADM's ancestral loop: the final sample (B, C, H, W)."""
        return _last(self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress
        ))  # fmt: skip

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  cond_fn=None, model_kwargs=None, device=None, progress=False) -> Iterator[dict]:  # fmt: skip
        """ADM's ancestral loop, yielding ``{"sample": x_{t-1}, "pred_xstart": x̂_0}`` after every step."""
        yield from self._loop("ddpm", 0.0, model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs,
                              device, progress)  # fmt: skip

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0) -> torch.Tensor:  # fmt: skip
        """ADM's DDIM loop: the final sample (B, C, H, W)."""
        return _last(self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress, eta
        ))  # fmt: skip

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False,
                                     eta=0.0) -> Iterator[dict]:  # fmt: skip
        """ADM's DDIM loop, yielding ``{"sample": x_{t-1}, "pred_xstart": x̂_0}`` after every step."""
        yield from self._loop("ddim", eta, model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs,
                              device, progress)  # fmt: skip

    def _loop(self, method, eta, model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device,
              progress) -> Iterator[dict]:  # fmt: skip
        if denoised_fn is not None:
            raise ValueError("denoised_fn is not supported by fastguide's loops; call the wrapped diffusion's own")
        kwargs = dict(model_kwargs or {})
        y = kwargs.pop("y", None)  # the rest (e.g. super-resolution's low_res) goes to the model as ADM passes it
        shape = tuple(int(s) for s in shape)
        if device is None:
            device = next(model.parameters()).device if isinstance(model, nn.Module) else torch.device("cpu")
        labels = torch.zeros(shape[0], dtype=torch.long) if y is None else y
        sampler = self._sampler(model, cond_fn, method, eta, clip_denoised, y is not None, shape, progress)
        steps = sampler.steps(labels, noise=GlobalNoise(shape, device, noise), device=device, model_kwargs=kwargs)
        for _, out, _ in steps:
            yield {"sample": out.x_prev, "pred_xstart": out.pred_xstart}
        if method == "ddim" and eta == 0:  # ADM draws (and multiplies by 0) one noise tensor per step
            for _ in range(self.schedule.num_steps):
                torch.randn(*shape, device=device)

    def _sampler(self, model, cond_fn, method, eta, clip_denoised, class_cond, shape, progress) -> GuidedSampler:
        """One GuidedSampler per (model, cond_fn, settings), kept so that its compiled step is reused."""
        config = dataclasses.replace(self.config, method=method, eta=float(eta), clip_denoised=bool(clip_denoised),
                                     variance=self.variance, progress=bool(progress))  # fmt: skip
        key = (id(model), id(cond_fn), config, class_cond, shape[1:])
        kept = self._samplers.get(key)
        if kept is not None and kept[0] is model and kept[1] is cond_fn:
            return kept[2]
        net = XStartToEps(model, self.schedule) if self.predict_xstart else model  # START_X: x̂_0 as ε
        if cond_fn is None or isinstance(cond_fn, CondFn):
            classifier = None if cond_fn is None else cond_fn.classifier
            policy = NoGuidance() if cond_fn is None else cond_fn.policy
            sampler = GuidedSampler(net, classifier, self.schedule, policy, config, image_shape=shape[1:],
                                    class_cond=class_cond)  # fmt: skip
        else:  # any ADM cond_fn: its gradient is applied as ADM's loops apply it
            if not callable(cond_fn):
                raise TypeError(f"cond_fn must be callable, got {type(cond_fn).__name__}")

            def adm_cond_fn(x, t, y, **kwargs):  # ADM calls cond_fn(x, t, **model_kwargs)
                return cond_fn(x, t, y=y, **kwargs) if class_cond else cond_fn(x, t, **kwargs)

            sampler = GuidedSampler(net, None, self.schedule, NoGuidance(), config, image_shape=shape[1:],
                                    class_cond=class_cond, cond_fn=adm_cond_fn)  # fmt: skip
        self._samplers[key] = (model, cond_fn, sampler)
        return sampler


def _last(steps: Iterator[dict]) -> torch.Tensor:
    final = None
    for final in steps:
        pass
    return final["sample"]


def accelerate(diffusion, config: SamplerConfig | None = None) -> AcceleratedDiffusion:
    """ADM's diffusion object with its sampling loops run by fastguide: the one-line change in an ADM script
    (``diffusion = fastguide.adm.accelerate(diffusion)``). ``config`` sets fastguide's fast path
    (compile, precision, ...); method, eta, clipping and variance come from each call and the object.

    Differences from ADM's loops, each an error rather than a silent change: ``denoised_fn`` is not
    supported. model_kwargs go to the model at every step as ADM passes them (``y`` to the classifier
    too; super-resolution's ``low_res``), and to an ADM cond_fn. x0-prediction models (``predict_xstart``) are sampled as
    eps-models through :class:`fastguide.diffusion.XStartToEps`.
    ``*_progressive`` raises a non-finite value (NaN/inf from a network) when the loop ends.
    """
    if isinstance(diffusion, AcceleratedDiffusion):
        return diffusion
    return AcceleratedDiffusion(diffusion, config)
