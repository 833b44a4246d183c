"""DPM-Solver++(3M) (Lu et al. 2022, arXiv:2211.01095: the multistep solver of order 3),
in data prediction, as diffusers' ``DPMSolverMultistepScheduler`` with solver_order 3, lower_order_final and
final_sigmas_type "zero".

With D0 the current x̂0 and the previous two (D1 = ``Carry.d1``, D2 = ``Carry.d2``), h = λ_next − λ,
r0 = h_prev/h and r1 = h_prev2/h, a third-order step is::

    x_next = (σ_next/σ)·x − α_next(e^{−h} − 1)·D0 + α_next((e^{−h} − 1)/h + 1)·Δ1 − α_next((e^{−h} − 1 + h)/h² − ½)·Δ2
    Δ1 = d0 + r0/(r0 + r1)·(d0 − d1),  Δ2 = (d0 − d1)/(r0 + r1),  d0 = (D0 − D1)/r0,  d1 = (D1 − D2)/r1

which the table folds into x_next = a·x + b·D0 + c·(D0 − D1) + f·(D1 − D2), one float64 row per step. The
order at step k of n is diffusers': 1 at the first and the last step, 2 at the second (and at the
second-to-last when n < 15), 3 elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import Carry, register
from .multistep import Multistep, threshold

FIELDS = ("a", "b", "c", "f")  # x_next = a·x + b·D0 + c·(D0 − D1) + f·(D1 − D2)


def order(k: int, n: int) -> int:
    """The order of step k of n (diffusers' lower_order_final with a last step to σ = 0)."""
    if k == 0 or k == n - 1:
        return 1
    if k == 1 or (k == n - 2 and n < 15):
        return 2
    return 3


@register
@dataclass(frozen=True, eq=False)
class Dpmpp3m(Multistep):
    """Third-order multistep in data prediction: DPM-Solver++(2M)'s grid and guidance, one more x̂0 of history."""

    name = "dpmpp3m"
    label = "DPM-Solver++(3M)"

    @classmethod
    def predictor(cls, alpha, sigma, lam, k: int, n: int) -> tuple[float, ...]:
        """(a, b, c, f): DPM-Solver++(2M)'s (a, b, c) where the order is 1 or 2 (f = 0), else third order."""
        a, b, c = super().predictor(alpha, sigma, lam, k, n)
        if order(k, n) < 3:  # 1 or 2: the order 2M has at that step too
            return a, b, c, 0.0
        h = lam[k + 1] - lam[k]
        em1 = math.expm1(-h)
        r0, r1 = (lam[k] - lam[k - 1]) / h, (lam[k - 1] - lam[k - 2]) / h
        w1 = alpha[k + 1] * (em1 / h + 1)  # the weight of Δ1
        w2 = -alpha[k + 1] * ((em1 + h) / h**2 - 0.5)  # the weight of Δ2
        c = (w1 * (1 + r0 / (r0 + r1)) + w2 / (r0 + r1)) / r0
        f = -(w1 * r0 / (r0 + r1) + w2 / (r0 + r1)) / r1
        return a, b, c, f

    @classmethod
    def corrector(cls, alpha, sigma, lam, k: int, n: int) -> tuple[float, ...]:
        return ()  # no corrector: the row is (a, b, c, f)

    def update(self, x, eps, xstart_coefs, row, carry: Carry):
        recip, recipm1 = xstart_coefs
        x0 = threshold(recip * x - recipm1 * eps, self.clip_denoised, self.dynamic_threshold, self.threshold_max)
        a, b, c, f = (row[:, i].reshape(-1, 1, 1, 1) for i in range(len(FIELDS)))
        return a * x + b * x0 + c * (x0 - carry.d1) + f * (carry.d1 - carry.d2), x0, x
