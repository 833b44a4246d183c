"""UniPC-bh2 (Zhao et al. 2023, arXiv:2302.04867, Alg. 2 and 3 with B(h) = e^h − 1), in data prediction, as
diffusers' ``UniPCMultistepScheduler`` with solver_order 2 and final_sigmas_type "zero".

Its predictor (ρ = ½) is exactly DPM-Solver++(2M)'s; the corrector (UniC) reuses the network output at the
new point, so it costs no extra network call."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .base import register
from .multistep import Multistep, predictor_order


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


@register
@dataclass(frozen=True, eq=False)
class Unipc(Multistep):
    """DPM-Solver++(2M)'s predictor, then UniC corrects each sample (from the second step on) with the ε of
    the new point."""

    name = "unipc"
    label = "UniPC-bh2"

    @classmethod
    def corrector(cls, alpha, sigma, lam, k: int, n: int) -> tuple[float, ...]:
        if k == 0:
            return super().corrector(alpha, sigma, lam, k, n)
        return _unic(alpha, sigma, lam, k, predictor_order(k - 1, n))
