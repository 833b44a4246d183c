"""What the multistep ODE solvers share (DPM-Solver++(2M), dpmpp2m.py; UniPC-bh2, unipc.py), in data prediction.

Both walk the same chain as DDIM: the respaced timesteps, noisiest first, then one last step to the
clean image (σ = 0, where the update returns x̂0, as DDIM's last step does). With λ = log(α/σ),
α = sqrt(ᾱ), σ = sqrt(1 − ᾱ), and h = λ_next − λ_now, a step from x at one point of the grid is::

    x̂0   = (x − σ·ε̃)/α, clipped or thresholded        (ε̃: the guided ε, as DDIM's: ε − σ·s·∇)
    x'   = w·x + ca·x_last + cb·D1 + cd·(D2 − D1) + ce·(x̂0 − D1)     UniPC's corrector (UniC); w = 1
                                                                      and the rest 0 for DPM-Solver++
    x_next = a·x' + b·x̂0 + c·(x̂0 − D1)

where D1, D2 are the x̂0 of the previous two steps and x_last the previous (corrected) sample. The
predictor is the same for both: first order (DDIM) at the first and the last step, second order
(c = b/(2r), r = h_prev/h) between. UniPC-2's predictor (bh2, ρ = ½) is exactly DPM-Solver++(2M)'s;
UniPC differs by its corrector, which reuses the network output at the new point, so it costs no extra
network call. The coefficients of every step are one float64 row per respaced index
(:meth:`Multistep.table`), cast once to float32, as the DDPM/DDIM coefficients are.

The step order follows diffusers' ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler``
(solver_order 2, lower_order_final, final_sigmas_type "zero"), which the tests run beside these.
References: Lu et al. 2022, DPM-Solver++ (arXiv:2211.01095), Alg. 2; Zhao et al. 2023, UniPC
(arXiv:2302.04867), Alg. 2 and 3 with B(h) = e^h − 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..schedule import Schedule, StepCoefficients
from .base import SOLVERS, Carry, Solver, StepInputs, names

SOLVER_FIELDS = ("a", "b", "c", "w", "ca", "cb", "cd", "ce")


def _grid(schedule: Schedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(α, σ, λ) in float64 at the grid points in step order (noisiest first), without the clean end."""
    alpha_bar = schedule.table("alpha_bar").numpy()[::-1]
    alpha, sigma = np.sqrt(alpha_bar), np.sqrt(1.0 - alpha_bar)
    return alpha, sigma, np.log(alpha) - np.log(sigma)


def predictor_order(k: int, n: int) -> int:
    """The predictor's order at step k of n: 1 at the first step (no history) and the last (to σ = 0)."""
    return min(2, n - k, k + 1)


def multistep_table(schedule: Schedule, method: str) -> torch.Tensor:
    """(N, F) float32 coefficient rows of the multistep solver ``method``, by respaced index (step k uses N−1−k)."""
    cls = SOLVERS.get(method)
    if cls is None or not cls.multistep:
        raise ValueError(f"unknown multistep solver {method!r}; expected one of {names(multistep=True)}")
    return cls.table(schedule)


def threshold(x0: torch.Tensor, clip: bool, ratio: float | None, max_value: float) -> torch.Tensor:
    """x̂0 clipped to [−1, 1] (ADM), or dynamically thresholded (Imagen): per sample s = the ``ratio``
    quantile of |x̂0| clamped to [1, max_value], then x̂0 clamped to [−s, s] and divided by s."""
    if ratio is not None:
        s = torch.quantile(x0.abs().flatten(1), ratio, dim=1).clamp(1.0, max_value).view(-1, 1, 1, 1)
        return torch.maximum(torch.minimum(x0, s), -s) / s
    return x0.clamp(-1, 1) if clip else x0


def multistep_update(
    x: torch.Tensor, eps: torch.Tensor, xstart_coefs: tuple[torch.Tensor, torch.Tensor], row: torch.Tensor,
    carry: Carry, clip: bool, ratio: float | None = None, max_value: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One DPM-Solver++(2M) or UniPC step from x with its (guided) ε: (x_next, x̂0, the corrected x).

    ``xstart_coefs`` are (1/sqrt(ᾱ), sqrt(1/ᾱ − 1)) as (B, 1, 1, 1); ``row`` is (B, len(SOLVER_FIELDS))."""
    recip, recipm1 = xstart_coefs
    x0 = threshold(recip * x - recipm1 * eps, clip, ratio, max_value)
    a, b, c, w, ca, cb, cd, ce = (row[:, i].reshape(-1, 1, 1, 1) for i in range(len(SOLVER_FIELDS)))
    d1, d2, x_last = carry.d1, carry.d2, carry.x_last
    corrected = w * x + ca * x_last + cb * d1 + cd * (d2 - d1) + ce * (x0 - d1)
    return a * corrected + b * x0 + c * (x0 - d1), x0, corrected


@dataclass(frozen=True, eq=False)
class Multistep(Solver):
    """A multistep solver in data prediction on the λ grid of the respaced schedule, guided through ε as DDIM
    is: its table is one float64 row of (predictor, corrector) coefficients per step (:data:`SOLVER_FIELDS`),
    and its step is :func:`multistep_update`. A subclass gives its corrector (:meth:`corrector`) or, for
    another update, its own :meth:`predictor`, :meth:`corrector` and :meth:`update`."""

    multistep = True
    takes_threshold = True
    default_respacing = "15"
    quick_respacing = "10"

    paper_form: bool = False  # the guided ε as the paper's ε − s∇ instead of ADM's ε − sqrt(1−ᾱ)·s∇
    dynamic_threshold: float | None = None  # threshold x̂0 at this quantile of |x̂0| (Imagen); None: clip
    threshold_max: float = 1.0  # the largest dynamic threshold

    @classmethod
    def from_config(cls, config, x, coefs, ones) -> Multistep:
        # the update is plain torch, fused by torch.compile: no op to resolve
        return cls(clip_denoised=config.clip_denoised, paper_form=config.ddim_guidance == "paper",
                   dynamic_threshold=config.dynamic_threshold, threshold_max=config.threshold_max)  # fmt: skip

    @classmethod
    def predictor(cls, alpha, sigma, lam, k: int, n: int) -> tuple[float, ...]:
        """(a, b, c) of the predictor x_next = a·x + b·x̂0 + c·(x̂0 − D1) at grid point k of n (float64 grids of
        :func:`_grid`): first order at the first step and at the last (to σ = 0, λ = ∞: x_next = x̂0), second
        order (c = b/(2r), r = h_prev/h) between."""
        if k == n - 1:
            return 0.0, 1.0, 0.0
        h = lam[k + 1] - lam[k]
        a, b = sigma[k + 1] / sigma[k], -alpha[k + 1] * math.expm1(-h)
        c = b / (2 * ((lam[k] - lam[k - 1]) / h)) if predictor_order(k, n) == 2 else 0.0
        return a, b, c

    @classmethod
    def corrector(cls, alpha, sigma, lam, k: int, n: int) -> tuple[float, ...]:
        """(w, ca, cb, cd, ce) of the corrector at grid point k of n (float64 grids of :func:`_grid`); none."""
        return 1.0, 0.0, 0.0, 0.0, 0.0

    @classmethod
    def table(cls, schedule: Schedule) -> torch.Tensor:
        """One float64 row (predictor, then corrector) per grid point, rounded once to float32, by respaced index."""
        alpha, sigma, lam = _grid(schedule)
        n = len(alpha)
        rows = [(*cls.predictor(alpha, sigma, lam, k, n), *cls.corrector(alpha, sigma, lam, k, n)) for k in range(n)]
        return torch.from_numpy(np.array(rows[::-1], dtype=np.float64)).float()

    def update(self, x, eps, xstart_coefs, row, carry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_next, x̂0, the corrected x) from x and its guided ε (:func:`multistep_update`)."""
        return multistep_update(x, eps, xstart_coefs, row, carry, self.clip_denoised, self.dynamic_threshold,
                                self.threshold_max)  # fmt: skip

    def step(self, inp: StepInputs, carry: Carry) -> tuple[torch.Tensor, torch.Tensor, Carry]:
        c = StepCoefficients.of(inp.coefs)
        eps = inp.eps
        if inp.grad is not None:
            weight = inp.scale.view(-1, 1, 1, 1)
            if not self.paper_form:  # sqrt(1 − ᾱ) as sqrt(1/ᾱ − 1)/sqrt(1/ᾱ), without cancellation
                weight = weight * (c.sqrt_recipm1_alpha_bar / c.sqrt_recip_alpha_bar)
            eps = eps - weight * inp.grad
        x_prev, xstart, corrected = self.update(
            inp.x, eps, (c.sqrt_recip_alpha_bar, c.sqrt_recipm1_alpha_bar), inp.row, carry)  # fmt: skip
        return x_prev, xstart, carry._replace(d1=xstart, d2=carry.d1, x_last=corrected)
