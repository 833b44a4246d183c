"""Triton guided DDPM and DDIM updates: x_t, ε (and v), ∇, per-sample scale and coefficients → x_{t−1}, x̂_0.

Each update is one elementwise pass over the batch, one program per (block of pixels, sample), so that
every sample may sit at its own timestep: its coefficients are read from its row of the
(B, NUM_COEFS) ``coefs`` matrix. Layers: ``@triton.jit`` kernels → ``launch_*`` (checks shapes, dtypes,
strides) → ``guided_ddpm_update_triton`` / ``guided_ddim_update_triton`` (the contracts of
:mod:`fastguide.kernels.reference`, whose ``*_ref`` functions are the oracles).
"""

from __future__ import annotations

import torch

from .reference import COEF, NUM_COEFS, VARIANCE_CODES
from .triton_common import check_float, jit, next_power_of_2, require_triton, tl

MAX_BLOCK = 1024  # pixels per program

# column of each coefficient in `coefs`, passed to the kernels as constexprs COL_<FIELD>
_COLUMNS = {f"COL_{name.upper()}": col for name, col in COEF.items()}


@jit
def _clip(x):
    """clamp(x, −1, 1) that keeps NaN (tl.minimum/maximum may drop it)."""
    return tl.where(x < -1.0, -1.0, tl.where(x > 1.0, 1.0, x))


@jit
def _store_rounded(ptr, value, mask):
    """Store float32 ``value`` at ``ptr`` in its dtype, rounding to nearest even.

    bfloat16 is rounded with integer ops: bits + 0x7FFF + (bit 16 of bits), keep the top 16 bits (NaN kept
    NaN). It is what the GPU's cvt.rn.bf16.f32 does, and Triton's interpreter truncates instead.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        top = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        top = tl.where(value != value, 0x7FC0, top)
        tl.store(ptr, top.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@jit
def _guided_ddpm_update_kernel(
    x_ptr,
    eps_ptr,
    v_ptr,
    grad_ptr,
    noise_ptr,
    scale_ptr,
    coefs_ptr,
    nonzero_ptr,
    x_prev_ptr,
    xstart_ptr,
    N,
    stride_x,
    stride_eps,
    stride_v,
    stride_grad,
    stride_noise,
    stride_scale,
    stride_cb,
    stride_cc,
    stride_nz,
    stride_out,
    VARIANCE: tl.constexpr,
    GUIDED: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
    COL_ALPHA_BAR: tl.constexpr,
    COL_ALPHA_BAR_PREV: tl.constexpr,
    COL_SQRT_RECIP_ALPHA_BAR: tl.constexpr,
    COL_SQRT_RECIPM1_ALPHA_BAR: tl.constexpr,
    COL_POSTERIOR_MEAN_COEF1: tl.constexpr,
    COL_POSTERIOR_MEAN_COEF2: tl.constexpr,
    COL_POSTERIOR_VARIANCE: tl.constexpr,
    COL_POSTERIOR_LOG_VARIANCE_CLIPPED: tl.constexpr,
    COL_LOG_BETA: tl.constexpr,
    COL_FIXED_LARGE_VARIANCE: tl.constexpr,
    COL_FIXED_LARGE_LOG_VARIANCE: tl.constexpr,
):
    """Guided ancestral step (paper Eq. 8; ADM p_sample + condition_mean) on BLOCK pixels of sample b.

    With the coefficients c of sample b (float32, operation order of fastguide.diffusion):
        x̂0 = c.sqrt_recip_alpha_bar·x − c.sqrt_recipm1_alpha_bar·ε, clamped to [−1, 1] if CLIP
        μ = c.posterior_mean_coef1·x̂0 + c.posterior_mean_coef2·x                  (DDPM Eq. 7)
        log σ², σ² by VARIANCE: 0 learned_range: f = (v + 1)/2,
                                  log σ² = f·c.log_beta + (1 − f)·c.posterior_log_variance_clipped
                                  (Improved DDPM Eq. 15), σ² = exp(log σ²);
                                1 learned: log σ² = v, σ² = exp(v);
                                2 fixed_small: c.posterior_variance, c.posterior_log_variance_clipped;
                                3 fixed_large: c.fixed_large_variance, c.fixed_large_log_variance
        μ += σ²·(scale[b]·∇)                                                         if GUIDED
        x_{t−1} = μ + (nonzero[b]·exp(½ log σ²))·z

    Args:
        x_ptr, eps_ptr, v_ptr, grad_ptr, noise_ptr: (B, N) inputs x_t, ε, v, ∇ log p(y|x_t), z; each
            sample's N = C·H·W values contiguous, sample strides stride_x ... stride_noise (0 allowed);
            float32/float16/bfloat16. v_ptr is read only for VARIANCE 0/1, grad_ptr only if GUIDED
            (pass any valid pointer otherwise).
        scale_ptr: (B,) guidance scale s, stride stride_scale (read only if GUIDED).
        coefs_ptr: (B, NUM_COEFS) float32 coefficients, strides (stride_cb, stride_cc); COL_* give the columns.
        nonzero_ptr: (B,) float32, 0 where t = 0, stride stride_nz.
        x_prev_ptr, xstart_ptr: (B, N) outputs x_{t−1} and x̂0 in x's dtype, sample stride stride_out.
        N: pixels per sample; the tail of the last block is masked.
    """
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    c = coefs_ptr + b * stride_cb
    x = tl.load(x_ptr + b * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + b * stride_eps + offs, mask=mask, other=0.0).to(tl.float32)
    noise = tl.load(noise_ptr + b * stride_noise + offs, mask=mask, other=0.0).to(tl.float32)

    r = tl.load(c + COL_SQRT_RECIP_ALPHA_BAR * stride_cc)
    q = tl.load(c + COL_SQRT_RECIPM1_ALPHA_BAR * stride_cc)
    coef1 = tl.load(c + COL_POSTERIOR_MEAN_COEF1 * stride_cc)
    coef2 = tl.load(c + COL_POSTERIOR_MEAN_COEF2 * stride_cc)

    xstart = r * x - q * eps
    if CLIP:
        xstart = _clip(xstart)
    mean = coef1 * xstart + coef2 * x

    if VARIANCE == 0:
        v = tl.load(v_ptr + b * stride_v + offs, mask=mask, other=0.0).to(tl.float32)
        frac = (v + 1.0) / 2.0
        log_var = frac * tl.load(c + COL_LOG_BETA * stride_cc) + (1.0 - frac) * tl.load(
            c + COL_POSTERIOR_LOG_VARIANCE_CLIPPED * stride_cc
        )
        var = tl.exp(log_var)
    elif VARIANCE == 1:
        log_var = tl.load(v_ptr + b * stride_v + offs, mask=mask, other=0.0).to(tl.float32)
        var = tl.exp(log_var)
    elif VARIANCE == 2:
        var = tl.load(c + COL_POSTERIOR_VARIANCE * stride_cc)
        log_var = tl.load(c + COL_POSTERIOR_LOG_VARIANCE_CLIPPED * stride_cc)
    else:
        var = tl.load(c + COL_FIXED_LARGE_VARIANCE * stride_cc)
        log_var = tl.load(c + COL_FIXED_LARGE_LOG_VARIANCE * stride_cc)

    if GUIDED:
        grad = tl.load(grad_ptr + b * stride_grad + offs, mask=mask, other=0.0).to(tl.float32)
        mean = mean + var * (grad * tl.load(scale_ptr + b * stride_scale).to(tl.float32))
    x_prev = mean + (tl.load(nonzero_ptr + b * stride_nz) * tl.exp(0.5 * log_var)) * noise

    out = b * stride_out + offs
    _store_rounded(x_prev_ptr + out, x_prev, mask)
    _store_rounded(xstart_ptr + out, xstart, mask)


@jit
def _guided_ddim_update_kernel(
    x_ptr,
    eps_ptr,
    grad_ptr,
    noise_ptr,
    scale_ptr,
    coefs_ptr,
    nonzero_ptr,
    x_prev_ptr,
    xstart_ptr,
    N,
    eta,
    stride_x,
    stride_eps,
    stride_grad,
    stride_noise,
    stride_scale,
    stride_cb,
    stride_cc,
    stride_nz,
    stride_out,
    GUIDED: tl.constexpr,
    PAPER_FORM: tl.constexpr,
    CLIP: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
    COL_ALPHA_BAR: tl.constexpr,
    COL_ALPHA_BAR_PREV: tl.constexpr,
    COL_SQRT_RECIP_ALPHA_BAR: tl.constexpr,
    COL_SQRT_RECIPM1_ALPHA_BAR: tl.constexpr,
    COL_POSTERIOR_MEAN_COEF1: tl.constexpr,
    COL_POSTERIOR_MEAN_COEF2: tl.constexpr,
    COL_POSTERIOR_VARIANCE: tl.constexpr,
    COL_POSTERIOR_LOG_VARIANCE_CLIPPED: tl.constexpr,
    COL_LOG_BETA: tl.constexpr,
    COL_FIXED_LARGE_VARIANCE: tl.constexpr,
    COL_FIXED_LARGE_LOG_VARIANCE: tl.constexpr,
):
    """Guided DDIM step (paper Eq. 4 and Alg. 1; ADM ddim_sample + condition_score) on BLOCK pixels of sample b.

    With ᾱ = c.alpha_bar, ᾱ' = c.alpha_bar_prev, r = c.sqrt_recip_alpha_bar, q = c.sqrt_recipm1_alpha_bar:
        x̂0 = r·x − q·ε, clamped to [−1, 1] if CLIP
        if GUIDED: ε̂ = (r·x − x̂0)/q;  w = 1 if PAPER_FORM else sqrt(1 − ᾱ)
                   x̂0 = r·x − q·(ε̂ − w·(scale[b]·∇))          (not clamped again, as ADM)
        ε = (r·x − x̂0)/q
        σ = (η·sqrt((1 − ᾱ')/(1 − ᾱ)))·sqrt(1 − ᾱ/ᾱ')
        x_{t−1} = x̂0·sqrt(ᾱ') + sqrt(1 − ᾱ' − σ²)·ε  (+ (nonzero[b]·σ)·z if HAS_NOISE, i.e. η > 0)
    Divisions and square roots are IEEE-rounded (div_rn, sqrt_rn), like torch's.

    Args:
        x_ptr, eps_ptr, grad_ptr, noise_ptr: (B, N) x_t, ε, ∇ log p(y|x_t), z; each sample's N values
            contiguous, sample strides stride_x ... stride_noise (0 allowed); float32/float16/bfloat16.
            grad_ptr is read only if GUIDED, noise_ptr only if HAS_NOISE.
        scale_ptr: (B,) guidance scale s, stride stride_scale (read only if GUIDED).
        coefs_ptr: (B, NUM_COEFS) float32 coefficients, strides (stride_cb, stride_cc); COL_* give the columns.
        nonzero_ptr: (B,) float32, 0 where t = 0, stride stride_nz.
        x_prev_ptr, xstart_ptr: (B, N) outputs x_{t−1} and x̂0 in x's dtype, sample stride stride_out.
        N: pixels per sample; eta: η >= 0 (float32).
    """
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    c = coefs_ptr + b * stride_cb
    alpha_bar = tl.load(c + COL_ALPHA_BAR * stride_cc)
    alpha_bar_prev = tl.load(c + COL_ALPHA_BAR_PREV * stride_cc)
    r = tl.load(c + COL_SQRT_RECIP_ALPHA_BAR * stride_cc)
    q = tl.load(c + COL_SQRT_RECIPM1_ALPHA_BAR * stride_cc)
    x = tl.load(x_ptr + b * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + b * stride_eps + offs, mask=mask, other=0.0).to(tl.float32)

    xstart = r * x - q * eps
    if CLIP:
        xstart = _clip(xstart)
    if GUIDED:
        grad = tl.load(grad_ptr + b * stride_grad + offs, mask=mask, other=0.0).to(tl.float32)
        guidance = grad * tl.load(scale_ptr + b * stride_scale).to(tl.float32)
        eps_hat = tl.div_rn(r * x - xstart, q)
        if PAPER_FORM:
            eps_hat = eps_hat - guidance
        else:
            eps_hat = eps_hat - tl.sqrt_rn(1.0 - alpha_bar) * guidance
        xstart = r * x - q * eps_hat
    eps = tl.div_rn(r * x - xstart, q)
    sigma = (eta * tl.sqrt_rn(tl.div_rn(1.0 - alpha_bar_prev, 1.0 - alpha_bar))) * tl.sqrt_rn(
        1.0 - tl.div_rn(alpha_bar, alpha_bar_prev)
    )
    x_prev = xstart * tl.sqrt_rn(alpha_bar_prev) + tl.sqrt_rn((1.0 - alpha_bar_prev) - sigma * sigma) * eps
    if HAS_NOISE:
        noise = tl.load(noise_ptr + b * stride_noise + offs, mask=mask, other=0.0).to(tl.float32)
        x_prev = x_prev + (tl.load(nonzero_ptr + b * stride_nz) * sigma) * noise

    out = b * stride_out + offs
    _store_rounded(x_prev_ptr + out, x_prev, mask)
    _store_rounded(xstart_ptr + out, xstart, mask)


def _sample_rows(name: str, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t`` checked against x's shape, as a tensor whose samples are each contiguous, and its sample stride.

    Views whose samples are already contiguous (including stride 0 over the batch, from expand) are used
    as they are; others (transposed, sliced, expanded inside a sample) are copied once.
    """
    if t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected x's shape {tuple(like.shape)}")
    check_float(name, t)
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, x is on {like.device}")
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            t = t.contiguous()
            break
        expected *= size
    return t, t.stride(0)


def _per_sample(name: str, t: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A (B,) float tensor given as any B-element tensor (float32 for non-supported float dtypes)."""
    if t.numel() != batch:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({batch},): one value per sample")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, x is on {device}")
    t = t.reshape(batch)
    return t if t.dtype == torch.float32 else t.float()


def _check_common(x, coefs, nonzero, grad, scale):
    """Shared checks of both updates; returns (coefs float32, nonzero (B,), scale (B,) or None)."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    check_float("x", x)
    B = x.shape[0]
    if coefs.shape != (B, NUM_COEFS):
        raise ValueError(f"coefs has shape {tuple(coefs.shape)}, expected ({B}, {NUM_COEFS}) (see Schedule.coefficients)")
    if not coefs.dtype.is_floating_point or coefs.device != x.device:
        raise ValueError(f"coefs must be a floating tensor on {x.device}, got {coefs.dtype} on {coefs.device}")
    if (grad is None) != (scale is None):
        raise ValueError("grad and scale must both be given (guided) or both be None (unguided)")
    scale = None if scale is None else _per_sample("scale", scale, B, x.device)
    return coefs.float(), _per_sample("nonzero", nonzero, B, x.device), scale


def _grid_and_block(x: torch.Tensor, block: int | None) -> tuple[tuple[int, int], int]:
    N = x[0].numel() if x.shape[0] else 0
    block = block or min(next_power_of_2(max(N, 1)), MAX_BLOCK)
    if block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    return ((N + block - 1) // block, x.shape[0]), block


def launch_guided_ddpm_update(
    x, eps, v, grad, scale, noise, coefs, nonzero, variance, clip_denoised, block=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the inputs of the guided DDPM update and run :func:`_guided_ddpm_update_kernel`.

    Grid: (ceil(C·H·W / block), B). ``block`` (power of two) defaults to min(next_pow2(C·H·W), MAX_BLOCK).
    Raises ValueError naming a bad shape, dtype or variance code; RuntimeError if Triton cannot serve.
    """
    coefs, nonzero, scale = _check_common(x, coefs, nonzero, grad, scale)
    if variance not in VARIANCE_CODES.values():
        raise ValueError(f"unknown variance code {variance!r}; expected one of {VARIANCE_CODES}")
    learned = variance in (VARIANCE_CODES["learned_range"], VARIANCE_CODES["learned"])
    if learned and v is None:
        raise ValueError("learned variances need v (the model's variance output), got None")
    if noise is None:
        raise ValueError("the DDPM update needs noise, got None")
    x, sx = _sample_rows("x", x, x)
    eps, s_eps = _sample_rows("eps", eps, x)
    noise, s_noise = _sample_rows("noise", noise, x)
    v, s_v = _sample_rows("v", v, x) if learned else (x, 0)
    grad, s_grad = _sample_rows("grad", grad, x) if grad is not None else (x, 0)
    require_triton(x, eps, v, grad, noise, scale, coefs, nonzero, kernel=_guided_ddpm_update_kernel)
    x_prev, xstart = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(2))
    grid, block = _grid_and_block(x, block)
    if grid[0] and grid[1]:
        _guided_ddpm_update_kernel[grid](
            x, eps, v, grad, noise, nonzero if scale is None else scale, coefs, nonzero, x_prev, xstart,
            x[0].numel(), sx, s_eps, s_v, s_grad, s_noise, 0 if scale is None else scale.stride(0),
            coefs.stride(0), coefs.stride(1), nonzero.stride(0), x_prev.stride(0),
            VARIANCE=variance, GUIDED=scale is not None, CLIP=bool(clip_denoised), BLOCK=block, **_COLUMNS,
        )  # fmt: skip
    return x_prev, xstart


def launch_guided_ddim_update(
    x, eps, grad, scale, noise, coefs, nonzero, eta, clip_denoised, paper_form, block=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the inputs of the guided DDIM update and run :func:`_guided_ddim_update_kernel`.

    Grid: (ceil(C·H·W / block), B). ``block`` (power of two) defaults to min(next_pow2(C·H·W), MAX_BLOCK).
    Raises ValueError naming a bad shape, dtype or eta; RuntimeError if Triton cannot serve.
    """
    coefs, nonzero, scale = _check_common(x, coefs, nonzero, grad, scale)
    eta = float(eta)
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and noise is None:
        raise ValueError(f"eta = {eta} > 0 needs noise, got None")
    x, sx = _sample_rows("x", x, x)
    eps, s_eps = _sample_rows("eps", eps, x)
    noise, s_noise = _sample_rows("noise", noise, x) if eta > 0 else (x, 0)
    grad, s_grad = _sample_rows("grad", grad, x) if grad is not None else (x, 0)
    require_triton(x, eps, grad, noise, scale, coefs, nonzero, kernel=_guided_ddim_update_kernel)
    x_prev, xstart = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(2))
    grid, block = _grid_and_block(x, block)
    if grid[0] and grid[1]:
        _guided_ddim_update_kernel[grid](
            x, eps, grad, noise, nonzero if scale is None else scale, coefs, nonzero, x_prev, xstart,
            x[0].numel(), eta, sx, s_eps, s_grad, s_noise, 0 if scale is None else scale.stride(0),
            coefs.stride(0), coefs.stride(1), nonzero.stride(0), x_prev.stride(0),
            GUIDED=scale is not None, PAPER_FORM=bool(paper_form), CLIP=bool(clip_denoised),
            HAS_NOISE=eta > 0, BLOCK=block, **_COLUMNS,
        )  # fmt: skip
    return x_prev, xstart


def guided_ddpm_update_triton(
    x: torch.Tensor,
    eps: torch.Tensor,
    v: torch.Tensor | None,
    grad: torch.Tensor | None,
    scale: torch.Tensor | None,
    noise: torch.Tensor,
    coefs: torch.Tensor,
    nonzero: torch.Tensor,
    variance: int,
    clip_denoised: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One guided DDPM step for a batch whose samples may sit at different timesteps, in one Triton pass.

    Same contract as :func:`fastguide.kernels.reference.guided_ddpm_update_ref`.

    Args:
        x, eps, noise: (B, C, H, W) float32/float16/bfloat16 (computed in float32).
        v: like x (the model's variance output) for ``learned_range``/``learned``, else None.
        grad, scale: ∇x log p(y|x_t) like x and (B,) scales, or both None (unguided).
        coefs: (B, NUM_COEFS) per-sample coefficients (``Schedule.coefficients``); nonzero: (B,), 0 where t = 0.
        variance: code from ``VARIANCE_CODES``; clip_denoised: clamp x̂0 to [−1, 1].
    Returns:
        (x_prev, pred_xstart), both (B, C, H, W) in x's dtype, contiguous.
    """
    return torch.ops.fastguide.guided_ddpm_update_triton(x, eps, v, grad, scale, noise, coefs, nonzero, variance,
                                                         clip_denoised)  # fmt: skip


def guided_ddim_update_triton(
    x: torch.Tensor,
    eps: torch.Tensor,
    grad: torch.Tensor | None,
    scale: torch.Tensor | None,
    noise: torch.Tensor | None,
    coefs: torch.Tensor,
    nonzero: torch.Tensor,
    eta: float,
    clip_denoised: bool,
    paper_form: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One guided DDIM step for a batch whose samples may sit at different timesteps, in one Triton pass.

    Same contract as :func:`fastguide.kernels.reference.guided_ddim_update_ref`.

    Args:
        x, eps: (B, C, H, W) float32/float16/bfloat16 (computed in float32).
        grad, scale: ∇x log p(y|x_t) like x and (B,) scales, or both None (unguided).
        noise: like x; used only when eta > 0 (may be None when eta = 0).
        coefs: (B, NUM_COEFS) per-sample coefficients (``Schedule.coefficients``); nonzero: (B,), 0 where t = 0.
        eta: η >= 0; clip_denoised: clamp the first x̂0 to [−1, 1];
        paper_form: ε̂ = ε − g (Algorithm 1) instead of ADM's ε − sqrt(1 − ᾱ)·g.
    Returns:
        (x_prev, pred_xstart), both (B, C, H, W) in x's dtype, contiguous.
    """
    return torch.ops.fastguide.guided_ddim_update_triton(x, eps, grad, scale, noise, coefs, nonzero, eta, clip_denoised,
                                                         paper_form)  # fmt: skip


# registered with torch.library (opaque ops with fake implementations), so that torch.compile traces a step
# that calls them without a graph break, as the C++ ops are
T = torch.Tensor


@torch.library.custom_op("fastguide::guided_ddpm_update_triton", mutates_args=())
def _guided_ddpm_update_op(
    x: T, eps: T, v: T | None, grad: T | None, scale: T | None, noise: T, coefs: T, nonzero: T, variance: int,
    clip_denoised: bool,
) -> tuple[T, T]:  # fmt: skip
    return launch_guided_ddpm_update(x, eps, v, grad, scale, noise, coefs, nonzero, variance, clip_denoised)


@torch.library.custom_op("fastguide::guided_ddim_update_triton", mutates_args=())
def _guided_ddim_update_op(
    x: T, eps: T, grad: T | None, scale: T | None, noise: T | None, coefs: T, nonzero: T, eta: float,
    clip_denoised: bool, paper_form: bool,
) -> tuple[T, T]:  # fmt: skip
    return launch_guided_ddim_update(x, eps, grad, scale, noise, coefs, nonzero, eta, clip_denoised, paper_form)


@_guided_ddpm_update_op.register_fake
def _(x, eps, v, grad, scale, noise, coefs, nonzero, variance, clip_denoised):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_guided_ddim_update_op.register_fake
def _(x, eps, grad, scale, noise, coefs, nonzero, eta, clip_denoised, paper_form):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(x.shape, dtype=x.dtype, device=x.device)
