"""Rounding-error bounds of float32 formulas, from their conditioning: the tolerance of the kernel tests.

A fused op evaluated in float32 differs from the float64 result of its formula by rounding alone. How
much depends on the formula and on the values, not on the CPU: x̂0 = r·x − q·ε near t = T cancels two
terms of size ~150 to leave one of size ~1, so its rounding error is ~u·(|r·x| + |q·ε|), a thousand
times u·|x̂0|. A :class:`Bounded` value carries, beside the float64 value of a formula, a bound on the
error of any float32 evaluation of it in that operation order (Higham, *Accuracy and Stability of
Numerical Algorithms*, §2.2, the standard model): every operation's own rounding
``|fl(a ∘ b) − a ∘ b| ≤ k·u·|a ∘ b| + TINY`` (k = 1; more for exp and division, as fast GPU versions
need; ``TINY`` covers underflow) plus its operands' errors carried through (first order and product
terms; exp and sqrt exactly). A fused multiply–add rounds once where the model counts two, so FMA
contraction stays inside the bound; so does any vector width or thread count. The bound is
elementwise, worst case, and needs no second float32 run to compare with.

:class:`Bounded` implements ``+ − × ÷``, ``clamp``, ``sqrt`` and ``exp`` (also as ``torch.exp`` and
``torch.sqrt``, through ``__torch_function__``), which is all that :mod:`fastguide.diffusion` uses, so
the updates' float64 oracles and their bounds come from running fastguide's own step functions on
Bounded inputs (``update_oracle.py``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

U32 = 2.0**-24  # unit roundoff of float32
TINY = 2.0**-126  # smallest normal float32: the absolute error an underflow (or flush to zero) can add
# an operation's own rounding, in units of u (half an ulp):
EXP_UNITS = 4.0  # exp: libm and Sleef are within 1 ulp, CUDA's fast exp within 2 ulp
DIV_UNITS = 4.0  # division: correctly rounded on CPUs and by div_rn, within 2 ulp for CUDA's approximate division
LOG_ABS = 2.0**-22  # log: CUDA's fast log2 errs by up to 2^-22.6 absolutely where the result is near 0


def _times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b for non-negative error terms, where 0·inf counts 0 (an exact zero times an exact infinity)."""
    return torch.where((a == 0) | (b == 0), torch.zeros_like(a * b), a * b)


class Bounded:
    """A float64 value and a bound on the error of a float32 evaluation of the formula that made it."""

    __slots__ = ("value", "err")

    def __init__(self, value, err=None):
        self.value = torch.as_tensor(value, dtype=torch.float64)
        self.err = torch.zeros_like(self.value) if err is None else torch.as_tensor(err, dtype=torch.float64)

    @classmethod
    def lift(cls, a) -> Bounded:
        """An input: exact (float32/fp16/bf16 tensors and the scalars used here are exactly representable)."""
        if isinstance(a, Bounded):
            return a
        return cls(a.detach().cpu().double() if torch.is_tensor(a) else float(a))

    @classmethod
    def rounded(cls, value: torch.Tensor, err: torch.Tensor, units=1.0, unit: float = U32, tiny: float = TINY) -> Bounded:  # fmt: skip
        """The result of one operation: the propagated error plus the operation's own rounding, ``units``
        times the unit roundoff ``unit`` of the result (``tiny``: what underflow, or flushing a subnormal
        to zero, can add). Exact infinities stay exact (an overflow is compared by equality, not by size)."""
        own = units * unit * (value.abs() + err) + tiny
        return cls(value, torch.where(value.isinf(), torch.zeros_like(err), err + own))

    # ---- arithmetic ----

    def __add__(self, other):
        o = Bounded.lift(other)
        return Bounded.rounded(self.value + o.value, self.err + o.err)

    __radd__ = __add__

    def __neg__(self):
        return Bounded(-self.value, self.err)

    def __sub__(self, other):
        return self + (-Bounded.lift(other))

    def __rsub__(self, other):
        return Bounded.lift(other) + (-self)

    def __mul__(self, other):
        o = Bounded.lift(other)
        a, b = self.value.abs(), o.value.abs()
        err = _times(a, o.err) + _times(b, self.err) + self.err * o.err
        return Bounded.rounded(self.value * o.value, err)

    __rmul__ = __mul__

    def __truediv__(self, other):
        o = Bounded.lift(other)
        value = self.value / o.value
        margin = (o.value.abs() - o.err).clamp_min(0)  # |b'| ≥ |b| − e_b; 0: the quotient is unbounded
        err = (self.err + _times(value.abs(), o.err)) / margin
        return Bounded.rounded(value, torch.where(self.err + o.err == 0, torch.zeros_like(err), err), DIV_UNITS)

    def __rtruediv__(self, other):
        return Bounded.lift(other) / self

    def __pow__(self, exponent):
        if exponent != 2:
            raise NotImplementedError(f"Bounded ** {exponent}: only squares are used")
        return self * self

    # ---- functions ----

    def sqrt(self) -> Bounded:
        value = self.value.clamp_min(0).sqrt()
        value = torch.where(self.value < 0, torch.full_like(value, math.nan), value)
        err = torch.minimum(self.err / value, self.err.sqrt())  # |√a' − √a| ≤ min(e/√a, √e)
        return Bounded.rounded(value, torch.where(self.err == 0, torch.zeros_like(err), err))

    def exp(self) -> Bounded:
        value = self.value.exp()
        err = _times(value, torch.expm1(self.err))  # |e^a' − e^a| ≤ e^a (e^|a'−a| − 1)
        # the argument |a| times u: fast exps scale a by log2(e) in float32 before 2^(·)
        return Bounded.rounded(value, err, EXP_UNITS + self.value.abs().nan_to_num(0.0, 0.0, 0.0))

    def clamp(self, lo: float, hi: float) -> Bounded:
        """clamp is 1-Lipschitz, and exact where the value is clamped even at the ends of its error."""
        certain = (self.value - self.err > hi) | (self.value + self.err < lo)
        return Bounded(self.value.clamp(lo, hi), torch.where(certain, torch.zeros_like(self.err), self.err))

    def float(self) -> Bounded:  # fastguide.diffusion casts to float32: the arithmetic is float32 already
        return self

    def to_dtype(self, dtype: torch.dtype) -> Bounded:
        """Stored in ``dtype``: one more rounding for float16/bfloat16 outputs (where float16's subnormals
        are spaced 2^-24 apart, so the rounding of a value under 2^-14 is absolute, not relative)."""
        if dtype == torch.float32:
            return self
        info = torch.finfo(dtype)  # below smallest_normal the spacing is smallest_normal·eps: half of it
        return Bounded.rounded(self.value, self.err, 1.0, info.eps / 2, info.smallest_normal * info.eps / 2)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        methods = {torch.exp: cls.exp, torch.sqrt: cls.sqrt, torch.clamp: cls.clamp}
        if func not in methods or kwargs:
            return NotImplemented
        return methods[func](cls.lift(args[0]), *args[1:])


# ---- the tolerance rule ----


def error_ratio(name: str, got: torch.Tensor, exact: Bounded) -> float:
    """max over entries of |got − exact| / bound; NaN must sit where the exact value has NaN, equal
    infinities count 0. Raises if the shapes differ."""
    got = got.detach().double().cpu()
    assert got.shape == exact.value.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.value.shape)}"
    assert torch.equal(got.isnan(), exact.value.isnan()), f"{name}: NaN in other places than the float64 result"
    same = (got == exact.value) | got.isnan()
    ratio = ((got - exact.value).abs() / exact.err.clamp_min(TINY)).masked_fill(same, 0.0)
    return ratio.max().item() if ratio.numel() else 0.0


def assert_within_bound(name: str, got: torch.Tensor, exact: Bounded, slack: float = 1.0) -> float:
    """|got − exact| ≤ slack · bound in every entry; returns the worst ratio (≤ slack)."""
    ratio = error_ratio(name, got, exact)
    worst = (got.detach().double().cpu() - exact.value).abs().nan_to_num(0.0).max().item() if got.numel() else 0.0
    assert ratio <= slack, (
        f"{name}: error {worst:.3g} is {ratio:.3g} × the float32 rounding-error bound of the formula"
        f" (allowed {slack:g} ×)"
    )
    return ratio


# ---- softmax–entropy–scale ----


class SoftmaxEntropyBound(NamedTuple):
    log_prob: Bounded
    entropy: Bounded
    scale: Bounded
    dlogits: Bounded


def softmax_entropy_bound(logits, y, gamma=1.0, entropy_floor=1e-6, max_scale=0.0, blocks=1) -> SoftmaxEntropyBound:
    """Values from the definitions (float64, autograd for d log p(y)/d logits, ``entr`` for H) and
    first-order bounds (the O(u²) product terms left out, far below the slack of the (K − 1)·u sums) for
    a float32 evaluation that sums K terms in any order, in up to ``blocks`` blocks whose
    running sums are rescaled by exp(m_old − m_new) when the max grows (an online softmax):

        d = z − m,  S = Σ e^d,  log p = d − log S,  H = Σ p·|log p|,  scale = γ log K / max(H, floor),
        dlogits = onehot(y) − p.

    A sum of K terms errs by at most (K − 1)·u·Σ|terms| in any order; each rescale of a term costs
    (EXP_UNITS + 2)·u, and the exponents' errors telescope to |d|·u. Classes with z = −inf are exact.
    """
    z = logits.detach().double().cpu()
    B, K = z.shape
    rows = torch.arange(B)
    yy = y.cpu().long()
    zl = z.requires_grad_(True)
    log_p = torch.log_softmax(zl, dim=-1)
    (dlogits,) = torch.autograd.grad(log_p[rows, yy.clamp(0, K - 1)].sum(), zl)
    z, log_p = z.detach(), log_p.detach()
    entropy = torch.special.entr(log_p.exp()).sum(-1)
    floored = entropy.clamp_min(entropy_floor)
    scale = gamma * math.log(K) / floored
    if max_scale > 0:
        scale = scale.clamp_max(max_scale)

    u, none = U32, z == -math.inf
    zero = torch.zeros_like(z)
    m = z.max(-1, keepdim=True).values
    d = torch.where(none, zero, z - m)
    w = d.exp()
    e_d = u * d.abs()
    e_w = torch.where(none, zero, w * (e_d + (EXP_UNITS + d.abs() + (EXP_UNITS + 2) * blocks) * u) + TINY)
    S = w.sum(-1, keepdim=True)
    e_S = e_w.sum(-1, keepdim=True) + (K - 1) * u * S
    log_S = S.log()
    e_log_S = e_S / (S - e_S).clamp_min(TINY) + 2 * u * log_S + LOG_ABS
    lp = torch.where(none, zero, d - log_S)
    e_lp = torch.where(none, zero, e_d + e_log_S + u * lp.abs())
    p = lp.exp().masked_fill(none, 0.0)
    e_p = torch.where(none, zero, p * (torch.expm1(e_lp) + (EXP_UNITS + lp.abs()) * u) + TINY)
    term = p * lp.abs()
    e_term = torch.where(none, zero, lp.abs() * e_p + _times(p, e_lp) + u * term + TINY)
    e_H = e_term.sum(-1) + (K - 1) * u * term.sum(-1)

    e_den = torch.where(entropy + e_H < entropy_floor, torch.zeros_like(e_H), e_H)  # max(·, floor): 1-Lipschitz
    e_scale = scale * (e_den / (floored - e_den).clamp_min(TINY) + 3 * u)
    if max_scale > 0:
        certain = gamma * math.log(K) / floored - e_scale > max_scale
        e_scale = torch.where(certain, torch.zeros_like(e_scale), e_scale)
    nan = torch.full_like(entropy, math.nan)
    label_lp = torch.where((yy >= 0) & (yy < K), log_p[rows, yy.clamp(0, K - 1)], nan)
    return SoftmaxEntropyBound(
        Bounded(label_lp, e_lp[rows, yy.clamp(0, K - 1)]),
        Bounded(entropy, e_H),
        Bounded(scale, e_scale),
        Bounded(dlogits, e_p + u * dlogits.abs()),
    )
