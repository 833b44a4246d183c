"""Multistep ODE solvers for guided sampling: DPM-Solver++(2M) and UniPC (bh2), in data prediction.

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
(:func:`multistep_table`), cast once to float32, as the DDPM/DDIM coefficients are.

The step order follows diffusers' ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler``
(solver_order 2, lower_order_final, final_sigmas_type "zero"), which the tests run beside these.
References: Lu et al. 2022, DPM-Solver++ (arXiv:2211.01095), Alg. 2; Zhao et al. 2023, UniPC
(arXiv:2302.04867), Alg. 2 and 3 with B(h) = e^h − 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .schedule import Schedule

MULTISTEP = ("dpmpp2m", "unipc")
SOLVER_FIELDS = ("a", "b", "c", "w", "ca", "cb", "cd", "ce")


class Carry(NamedTuple):
    """What a step hands to the next: the multistep solvers' history and the last guidance (all (B, ...))."""

    d1: torch.Tensor  # x̂0 of the previous step
    d2: torch.Tensor  # x̂0 of the step before it (UniPC's second-order corrector)
    x_last: torch.Tensor  # the previous step's (corrected) sample (UniPC)
    scale: torch.Tensor  # (B,) the last guidance scale the classifier gave
    grad: torch.Tensor  # the last classifier gradient ∇x log p(y|x_t)

    @classmethod
    def zeros(cls, x: torch.Tensor) -> Carry:
        # distinct tensors: a compiled step is traced for unaliased inputs
        zero = [torch.zeros_like(x) for _ in range(4)]
        return cls(zero[0], zero[1], zero[2], torch.zeros(x.shape[0], device=x.device), zero[3])


def _grid(schedule: Schedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(α, σ, λ) in float64 at the grid points in step order (noisiest first), without the clean end."""
    alpha_bar = schedule.table("alpha_bar").numpy()[::-1]
    alpha, sigma = np.sqrt(alpha_bar), np.sqrt(1.0 - alpha_bar)
    return alpha, sigma, np.log(alpha) - np.log(sigma)


def predictor_order(k: int, n: int) -> int:
    """The predictor's order at step k of n: 1 at the first step (no history) and the last (to σ = 0)."""
    return min(2, n - k, k + 1)


def multistep_table(schedule: Schedule, method: str) -> torch.Tensor:
    """(N, len(SOLVER_FIELDS)) float32 coefficient rows, indexed by respaced index (step k uses N−1−k)."""
    if method not in MULTISTEP:
        raise ValueError(f"unknown multistep solver {method!r}; expected one of {MULTISTEP}")
    alpha, sigma, lam = _grid(schedule)
    n = len(alpha)
    rows = np.zeros((n, len(SOLVER_FIELDS)), dtype=np.float64)
    for k in range(n):
        a, b, c = 0.0, 1.0, 0.0  # the last step, to σ = 0 (λ = ∞): x_next = x̂0
        if k < n - 1:
            h = lam[k + 1] - lam[k]
            a, b = sigma[k + 1] / sigma[k], -alpha[k + 1] * math.expm1(-h)
            if predictor_order(k, n) == 2:
                c = b / (2 * ((lam[k] - lam[k - 1]) / h))
        w, ca, cb, cd, ce = 1.0, 0.0, 0.0, 0.0, 0.0
        if method == "unipc" and k > 0:
            w, ca, cb, cd, ce = _unic(alpha, sigma, lam, k, predictor_order(k - 1, n))
        rows[k] = (a, b, c, w, ca, cb, cd, ce)
    return torch.from_numpy(rows[::-1].copy()).float()


def _unic(alpha, sigma, lam, k: int, order: int) -> tuple[float, ...]:
    """UniC-bh2 at grid point k, correcting the sample the order-``order`` predictor made from point k−1:
    (w, ca, cb, cd, ce) of x' = ca·x_{k−1} + cb·D1 + cd·(D2 − D1) + ce·(x̂0_k − D1)."""
    h = lam[k] - lam[k - 1]
    hh = -h  # data prediction
    phi1 = math.expm1(hh)  # h·φ1(h)
    b_h = phi1  # bh2: B(h) = e^h − 1
    ca, cb = sigma[k] / sigma[k - 1], -alpha[k] * phi1
    if order == 1:
        return 0.0, ca, cb, 0.0, -alpha[k] * b_h * 0.5
    r1 = (lam[k - 2] - lam[k - 1]) / h
    phi2 = phi1 / hh - 1
    g = np.array([phi2 / b_h, (phi2 / hh - 0.5) * 2 / b_h])
    rho = np.linalg.solve(np.array([[1.0, 1.0], [r1, 1.0]]), g)
    return 0.0, ca, cb, -alpha[k] * b_h * rho[0] / r1, -alpha[k] * b_h * rho[1]


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
