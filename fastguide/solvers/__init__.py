"""The sampling methods, one module each, behind one protocol (:class:`Solver`, base.py) and one registry
(:data:`SOLVERS`): DDPM, DDIM, DPM-Solver++(2M), UniPC-bh2 and DPM-Solver++(3M), in that order (the order
of METHODS)."""

from .base import SOLVERS, Carry, Solver, StepInputs, names, register
from . import ddpm, ddim, dpmpp2m, unipc, dpmpp3m  # noqa: E402,F401  (registration order)
from .multistep import Multistep, multistep_table, predictor_order, threshold

METHODS = tuple(SOLVERS)  # ("ddpm", "ddim", "dpmpp2m", "unipc", "dpmpp3m")
MULTISTEP = names(multistep=True)

__all__ = ["Carry", "METHODS", "MULTISTEP", "Multistep", "SOLVERS", "Solver", "StepInputs", "multistep_table",
           "names", "predictor_order", "register", "threshold"]
