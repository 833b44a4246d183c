"""The one place that loads the compiled extension ``fastguide._C`` (the batched guided step).

Importing ``fastguide._C`` registers ``torch.ops.fastguide.guided_ddpm_update`` and
``torch.ops.fastguide.guided_ddim_update`` (CPU, and CUDA where built with it); this module adds their
fake implementations so that ``torch.compile`` traces them without graph breaks.

``AVAILABLE`` says whether the ops can be used; ``REASON`` says why not (``None`` when available):
"not built" (no compiled module: built with FASTGUIDE_NO_EXT=1, or without torch), "built for another
torch" (undefined symbols, or the torch version baked in at build time differs from the running one),
or "disabled" (FASTGUIDE_NO_EXT=1 at run time). Reading ``AVAILABLE`` warns once when it is False;
importing this module never warns. The op contracts are those of :mod:`fastguide.kernels.reference`.
"""

from __future__ import annotations

import os
import warnings

import torch

__all__ = ["AVAILABLE", "REASON", "ExtensionUnavailableWarning", "guided_ddim_update", "guided_ddpm_update"]

_REBUILD = "rebuild it with `pip install --no-build-isolation -e .` in the fastguide checkout"


class ExtensionUnavailableWarning(UserWarning):
    """fastguide._C cannot be used; the pure-torch path serves instead."""


def _register_fakes() -> None:
    """Shape/dtype propagation of the ops for FakeTensor tracing (torch.compile, opcheck)."""

    @torch.library.register_fake("fastguide::guided_ddpm_update")
    def _(x, eps, v, grad, scale, noise, coefs, nonzero, variance, clip_denoised):
        return torch.empty_like(x), torch.empty_like(x)

    @torch.library.register_fake("fastguide::guided_ddim_update")
    def _(x, eps, grad, scale, noise, coefs, nonzero, eta, clip_denoised, paper_form):
        return torch.empty_like(x), torch.empty_like(x)


def _load() -> str | None:
    """Import fastguide._C; None when it is usable, else why not."""
    if os.environ.get("FASTGUIDE_NO_EXT") == "1":
        return "disabled: FASTGUIDE_NO_EXT=1 is set, so fastguide._C is neither built nor loaded"
    try:
        from . import _C
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}._C":
            return f"fastguide._C could not be loaded: {e}"
        return f"not built: there is no compiled fastguide._C in {os.path.dirname(__file__)}; {_REBUILD}"
    except ImportError as e:  # the module exists but does not link against this torch
        if "undefined symbol" in str(e) or "symbol not found" in str(e):
            return f"built for another torch: {e}; this is torch {torch.__version__}; {_REBUILD}"
        return f"fastguide._C could not be loaded: {e}"
    built = _C.TORCH_VERSION or _C.TORCH_HEADER_VERSION
    running = torch.__version__ if _C.TORCH_VERSION else torch.__version__.split("+")[0]
    if built != running:
        return f"built for another torch: fastguide._C was built for torch {built}, this is torch {running}; {_REBUILD}"
    _register_fakes()
    return None


REASON: str | None = _load()
_AVAILABLE = REASON is None
_warned = False


def __getattr__(name: str):
    # AVAILABLE is computed at import but read through here, so that the first read warns (once)
    global _warned
    if name == "AVAILABLE":
        if not _AVAILABLE and not _warned:
            _warned = True
            warnings.warn(f"fastguide._C is unavailable ({REASON})", ExtensionUnavailableWarning, stacklevel=2)
        return _AVAILABLE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _require() -> None:
    if not _AVAILABLE:
        raise RuntimeError(f"fastguide._C is unavailable: {REASON}")


def guided_ddpm_update(
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
    """The fused guided DDPM step of the extension; contract of ``kernels.reference.guided_ddpm_update_ref``.

    Args:
        x, eps, noise: (B, C, H, W) float32/float16/bfloat16, all one dtype and device.
        v: like x, the model's variance output (learned variances only), else None.
        grad, scale: (B, C, H, W) ∇x log p(y|x_t) and (B,) per-sample scale, or both None (unguided).
        coefs: (B, NUM_COEFS) per-sample schedule coefficients (``Schedule.coefficients``).
        nonzero: (B,) 0 where t = 0.
        variance: code from ``kernels.reference.VARIANCE_CODES``.
    Returns:
        (x_prev, pred_xstart), both like x.
    Raises:
        RuntimeError: the extension is unavailable (with the reason), or an input breaks the contract.
    """
    _require()
    return torch.ops.fastguide.guided_ddpm_update(
        x, eps, v, grad, scale, noise, coefs, nonzero, int(variance), bool(clip_denoised)
    )


def guided_ddim_update(
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
    """The fused guided DDIM step of the extension; contract of ``kernels.reference.guided_ddim_update_ref``.

    Args as :func:`guided_ddpm_update`, except: no v; noise may be None when ``eta == 0``;
    ``eta`` ≥ 0 (0 deterministic, 1 DDPM-like); ``paper_form``: ε̂ = ε − g (Alg. 1) instead of ADM's
    ε̂ = ε − sqrt(1 − ᾱ_t)·g.
    Returns:
        (x_prev, pred_xstart), both like x.
    """
    _require()
    return torch.ops.fastguide.guided_ddim_update(
        x, eps, grad, scale, noise, coefs, nonzero, float(eta), bool(clip_denoised), bool(paper_form)
    )
