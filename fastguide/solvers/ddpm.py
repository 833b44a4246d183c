"""Ancestral DDPM sampling (Ho et al. 2020) with ADM's variances, guided as ADM guides it (the mean shifted
by s·Σ·∇), through the fused update op."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import ops
from ..kernels.reference import VARIANCE_CODES
from .base import Carry, Solver, StepInputs, register


@register
@dataclass(frozen=True, eq=False)
class Ddpm(Solver):
    """p(x_{t−1}|x_t) with ADM's variance (learned range, learned, fixed small or large), its mean shifted by
    s·Σ·∇x log p(y|x_t); the whole update is one fused op (:func:`fastguide.ops.guided_ddpm_update`)."""

    name = "ddpm"
    label = "DDPM"
    default_respacing = "250"  # the paper's DDPM-250
    quick_respacing = "25"

    variance: str = "auto"  # or one of fastguide.diffusion.VARIANCES; auto: learned range for 2C outputs,
    #   else fixed large
    update_op: Callable | None = None  # the resolved guided_ddpm_update

    @classmethod
    def draws_noise(cls, config) -> bool:
        return True

    @classmethod
    def from_config(cls, config, x, coefs, ones) -> Ddpm:
        update = ops.resolve("guided_ddpm_update", x, x, x, x, ones, x, coefs, ones, 0, True)
        return cls(clip_denoised=config.clip_denoised, variance=config.variance, update_op=update)

    def step(self, inp: StepInputs, carry: Carry) -> tuple[torch.Tensor, torch.Tensor, Carry]:
        v = inp.v
        variance = self.variance if self.variance != "auto" else ("fixed_large" if v is None else "learned_range")
        if variance.startswith("learned") and v is None:
            raise ValueError(f"variance {variance!r} needs a model with 2C output channels (eps and v)")
        x_prev, xstart = self.update_op(
            inp.x, inp.eps, v, inp.grad, inp.scale, inp.noise, inp.coefs, inp.nonzero, VARIANCE_CODES[variance],
            self.clip_denoised,
        )  # fmt: skip
        return x_prev, xstart, carry
