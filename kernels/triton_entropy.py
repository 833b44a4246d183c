"""Triton softmax–entropy–scale: log p(y), H(p), the EDS scale and onehot(y) − p from logits, in one launch.

Layers: :func:`_softmax_entropy_scale_kernel` (one program per row) → :func:`launch_softmax_entropy_scale`
(checks shapes, dtypes and strides) → :func:`softmax_entropy_scale_triton` (the op's contract, see
:mod:`fastguide.kernels.reference`; :func:`~fastguide.kernels.reference.softmax_entropy_scale_ref` is the oracle).
"""

from __future__ import annotations

import math

import torch

from .reference import SoftmaxEntropy
from .triton_common import SUPPORTED_INTS, check_float, jit, next_power_of_2, require_triton, tl

MAX_BLOCK_K = 4096  # classes per block; wider rows loop over blocks


@jit
def _softmax_entropy_scale_kernel(
    logits_ptr,
    labels_ptr,
    log_prob_ptr,
    entropy_ptr,
    scale_ptr,
    dlogits_ptr,
    K,
    stride_lb,
    stride_lk,
    stride_y,
    stride_db,
    numerator,
    entropy_floor,
    max_scale,
    BLOCK_K: tl.constexpr,
):
    """One row b of logits z (K classes), label y = labels[b]; all arithmetic in float32.

    Sweep 1 (online softmax, flash-style): per block, m ← max(m, max_k z_k) and per lane
    s ← s·exp(m_old − m) + exp(z_k − m); then S = Σ_lanes s = Σ_k exp(z_k − m).
    Sweep 2: log p_k = (z_k − m) − log S, p_k = exp(log p_k),
        H = −Σ_k p_k log p_k (terms with log p_k = −inf count 0: p = 0 classes add nothing),
        dlogits_k = [k = y] − p_k (= ∂ log p_y / ∂ z_k),
    and log p(y) = (z_y − m) − log S, scale = numerator / max(H, entropy_floor) capped at max_scale
    (numerator = γ·log K, EDS). Any NaN in the row makes log S NaN, so the whole row is NaN whether or
    not the hardware max returns NaN. A label outside [0, K) gives log p(y) = NaN (no host check).

    Args:
        logits_ptr: (B, K) logits, float32/float16/bfloat16, strides (stride_lb, stride_lk); any strides
            (transposed views, stride 0 from expand).
        labels_ptr: (B,) int32/int64 class labels, stride stride_y.
        log_prob_ptr, entropy_ptr, scale_ptr: (B,) float32 outputs, contiguous.
        dlogits_ptr: (B, K) float32 output, row stride stride_db, unit column stride.
        K: number of classes.
        numerator: γ·log K; entropy_floor: lower bound of H in the scale; max_scale: cap (inf = none).
        BLOCK_K: classes per block (power of two); K > BLOCK_K loops over ceil(K / BLOCK_K) blocks.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_lb
    cols = tl.arange(0, BLOCK_K).to(tl.int64)  # k · stride_lk may pass 2³¹ for transposed views

    m = -float("inf")  # running max (scalar)
    s = tl.zeros([BLOCK_K], dtype=tl.float32)  # per-lane Σ exp(z − m)
    n_nan = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        z = tl.load(row_ptr + k * stride_lk, mask=k < K, other=-float("inf")).to(tl.float32)
        n_nan += (z != z).to(tl.int32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        base = tl.where(m_new == -float("inf"), 0.0, m_new)  # all −inf so far: avoid −inf − (−inf)
        s = s * tl.exp(m - base) + tl.exp(z - base)
        m = m_new
    log_s = tl.log(tl.sum(s, axis=0))
    log_s = tl.where(tl.sum(n_nan, axis=0) > 0, float("nan"), log_s)

    y = tl.load(labels_ptr + row * stride_y).to(tl.int64)
    h = tl.zeros([BLOCK_K], dtype=tl.float32)  # per-lane Σ p log p
    out_ptr = dlogits_ptr + row * stride_db
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        z = tl.load(row_ptr + k * stride_lk, mask=k < K, other=-float("inf")).to(tl.float32)
        log_p = (z - m) - log_s
        p = tl.exp(log_p)
        h += p * tl.where(log_p == -float("inf"), 0.0, log_p)  # p = 0 there: 0, not 0·(−inf)
        tl.store(out_ptr + k, tl.where(k == y, 1.0, 0.0) - p, mask=k < K)
    entropy = -tl.sum(h, axis=0)

    valid = (y >= 0) & (y < K)
    z_y = tl.load(row_ptr + y * stride_lk, mask=valid, other=float("nan")).to(tl.float32)
    floored = tl.where(entropy < entropy_floor, entropy_floor, entropy)  # NaN-preserving max
    scale = tl.div_rn(numerator, floored)
    scale = tl.where(scale > max_scale, max_scale, scale)  # NaN-preserving min
    tl.store(log_prob_ptr + row, (z_y - m) - log_s)
    tl.store(entropy_ptr + row, entropy)
    tl.store(scale_ptr + row, scale)


def launch_softmax_entropy_scale(
    logits: torch.Tensor,
    y: torch.Tensor,
    gamma: float,
    entropy_floor: float,
    max_scale: float,
    block_k: int | None = None,
) -> SoftmaxEntropy:
    """Check the inputs and run :func:`_softmax_entropy_scale_kernel` with one program per row.

    Args:
        logits: (B, K), K >= 1, float32/float16/bfloat16, any strides (passed to the kernel, not copied).
        y: (B,) int32/int64 labels, any stride.
        block_k: classes per block (power of two); default min(next_pow2(K), MAX_BLOCK_K).
    Raises:
        ValueError: bad shape, dtype or block size (the message names it).
        RuntimeError: the Triton backend cannot serve these tensors (see ``triton_refusal``).
    """
    if logits.dim() != 2 or y.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (B, K) and labels (B,), got {tuple(logits.shape)} and {tuple(y.shape)}")
    B, K = logits.shape
    if K < 1:
        raise ValueError(f"logits {tuple(logits.shape)} have no classes")
    check_float("logits", logits)
    if y.dtype not in SUPPORTED_INTS:
        raise ValueError(f"labels must be int32 or int64, got {y.dtype}")
    if block_k is None:
        block_k = min(next_power_of_2(K), MAX_BLOCK_K)
    if block_k < 1 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two, got {block_k}")
    require_triton(logits, y, kernel=_softmax_entropy_scale_kernel)
    f32 = dict(dtype=torch.float32, device=logits.device)
    log_prob, entropy, scale = (torch.empty(B, **f32) for _ in range(3))
    dlogits = torch.empty(B, K, **f32)
    if B > 0:
        _softmax_entropy_scale_kernel[(B,)](
            logits, y, log_prob, entropy, scale, dlogits,
            K, logits.stride(0), logits.stride(1), y.stride(0), dlogits.stride(0),
            gamma * math.log(K), entropy_floor, max_scale if max_scale > 0 else math.inf,
            BLOCK_K=block_k, num_warps=8 if block_k >= 2048 else 4,
        )  # fmt: skip
    return SoftmaxEntropy(log_prob, entropy, scale, dlogits)


def softmax_entropy_scale_triton(
    logits: torch.Tensor, y: torch.Tensor, gamma: float = 1.0, entropy_floor: float = 1e-6, max_scale: float = 0.0
) -> SoftmaxEntropy:
    """log p(y), entropy H, EDS scale and dlogits = onehot(y) − p from logits, in one Triton launch.

    Same contract as :func:`fastguide.kernels.reference.softmax_entropy_scale_ref`.

    Args:
        logits: (B, K) float32/float16/bfloat16 (computed in float32), any strides.
        y: (B,) int32/int64 labels in [0, K).
        gamma: EDS's γ; the scale is γ·log K / max(H, entropy_floor).
        entropy_floor: lower bound on H in the scale's denominator.
        max_scale: cap on the scale; <= 0 means no cap.
    Returns:
        SoftmaxEntropy(log_prob (B,), entropy (B,), scale (B,), dlogits (B, K)), all float32.
    """
    return SoftmaxEntropy(*torch.ops.fastguide.softmax_entropy_scale_triton(logits, y, gamma, entropy_floor, max_scale))


# registered with torch.library (an opaque op with a fake implementation), so that torch.compile traces a
# step that calls it without a graph break, as the C++ ops are
@torch.library.custom_op("fastguide::softmax_entropy_scale_triton", mutates_args=())
def _softmax_entropy_scale_op(
    logits: torch.Tensor, y: torch.Tensor, gamma: float, entropy_floor: float, max_scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(launch_softmax_entropy_scale(logits, y, gamma, entropy_floor, max_scale))


@_softmax_entropy_scale_op.register_fake
def _(logits, y, gamma, entropy_floor, max_scale):
    B, K = logits.shape
    rows = [logits.new_empty(B, dtype=torch.float32) for _ in range(3)]
    return (*rows, logits.new_empty(B, K, dtype=torch.float32))
