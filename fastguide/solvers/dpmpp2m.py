"""DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2), in data prediction, as diffusers'
``DPMSolverMultistepScheduler`` with solver_order 2, lower_order_final and final_sigmas_type "zero"."""

from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .multistep import Multistep


@register
@dataclass(frozen=True, eq=False)
class Dpmpp2m(Multistep):
    """The shared second-order multistep predictor (first order at the first and the last step), no corrector."""

    name = "dpmpp2m"
    label = "DPM-Solver++(2M)"
