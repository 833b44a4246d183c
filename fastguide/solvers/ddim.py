"""DDIM (Song et al. 2021), guided as ADM and the EDS release guide it, through the fused update op."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import ops
from .base import Carry, Solver, StepInputs, register


@register
@dataclass(frozen=True, eq=False)
class Ddim(Solver):
    """x̂0 from the guided ε (ADM: ε − sqrt(1−ᾱ)·s·∇; the paper's Alg. 1: ε − s·∇), then DDIM's update with
    stochasticity eta; the whole update is one fused op (:func:`fastguide.ops.guided_ddim_update`)."""

    name = "ddim"
    label = "DDIM"
    default_respacing = "ddim25"  # the paper's DDIM-25
    quick_respacing = "ddim10"
    takes_eta = True

    eta: float = 0.0
    paper_form: bool = False  # the paper's ε − s∇ instead of ADM's ε − sqrt(1−ᾱ)·s∇
    update_op: Callable | None = None  # the resolved guided_ddim_update

    @classmethod
    def draws_noise(cls, config) -> bool:
        return config.eta > 0

    @classmethod
    def from_config(cls, config, x, coefs, ones) -> Ddim:
        update = ops.resolve("guided_ddim_update", x, x, x, ones, x, coefs, ones, config.eta, True, False)
        return cls(clip_denoised=config.clip_denoised, eta=config.eta, paper_form=config.ddim_guidance == "paper",
                   update_op=update)  # fmt: skip

    def step(self, inp: StepInputs, carry: Carry) -> tuple[torch.Tensor, torch.Tensor, Carry]:
        x_prev, xstart = self.update_op(
            inp.x, inp.eps, inp.grad, inp.scale, inp.noise, inp.coefs, inp.nonzero, self.eta, self.clip_denoised,
            self.paper_form,
        )  # fmt: skip
        return x_prev, xstart, carry
