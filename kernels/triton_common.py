"""What the Triton kernels share: the one guarded import of triton and the backend's refusal reasons.

Importing this module (and the kernel modules built on it) never fails: when triton is missing,
``triton`` and ``tl`` are None, :func:`jit` returns the plain function, and :func:`triton_refusal`
says why every input is refused. Whether the kernels run under the interpreter is fixed when they
are decorated (triton reads ``TRITON_INTERPRET`` then), so set ``TRITON_INTERPRET=1`` before importing
``fastguide.kernels.triton_*`` to run them on CPU tensors.
"""

from __future__ import annotations

import os

import torch

try:  # the only place triton is imported
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: str | None = None
except Exception as e:  # ImportError, or a broken install failing at import
    triton = tl = None
    TRITON_IMPORT_ERROR = f"triton is not importable ({type(e).__name__}: {e})"

SUPPORTED_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_INTS = (torch.int32, torch.int64)  # class labels


_KERNELS: list = []  # every kernel decorated through jit(), to know the mode they were built in


def jit(fn):
    """``triton.jit(fn)`` when triton is importable, else ``fn`` itself (never launched: launchers refuse first)."""
    if triton is None:
        return fn
    kernel = triton.jit(fn)
    _KERNELS.append(kernel)
    return kernel


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors with numpy)."""
    return type(kernel).__name__ == "InterpretedFunction"


def triton_refusal(*tensors: torch.Tensor | None, kernel=None) -> str | None:
    """Why the Triton backend cannot serve these tensors, or None if it can.

    Args:
        tensors: the op's tensor arguments; None entries (optional inputs) are skipped.
        kernel: the jitted kernel that would run; it decides whether CPU tensors are allowed
            (interpreted kernels only). Without it, the kernels already defined decide, or, before any
            is, the current ``TRITON_INTERPRET``.
    Returns:
        A one-line reason ("triton is not importable ...", "tensors on cpu need TRITON_INTERPRET=1 ...",
        "unsupported dtype ..."), or None.
    """
    if TRITON_IMPORT_ERROR is not None:
        return TRITON_IMPORT_ERROR
    given = [t for t in tensors if t is not None]
    if kernel is not None:
        interpreted = is_interpreted(kernel)
    elif _KERNELS:
        interpreted = all(is_interpreted(k) for k in _KERNELS)
    else:
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    devices = {t.device for t in given}
    if len(devices) > 1:
        return f"tensors are on different devices: {sorted(str(d) for d in devices)}"
    for t in given:
        if t.device.type == "cpu" and not interpreted:
            return (
                "tensors on cpu need the Triton interpreter: set TRITON_INTERPRET=1 before triton and "
                "fastguide.kernels.triton_* are imported"
            )
        if t.device.type not in ("cpu", "cuda"):
            return f"triton does not run on device {t.device}"
        if t.dtype not in SUPPORTED_FLOATS + SUPPORTED_INTS:
            return f"unsupported dtype {t.dtype}; triton kernels take float32/float16/bfloat16 (int32/int64 labels)"
    return None


def require_triton(*tensors: torch.Tensor | None, kernel=None) -> None:
    """Raise RuntimeError with :func:`triton_refusal`'s reason if the Triton backend cannot serve these tensors."""
    reason = triton_refusal(*tensors, kernel=kernel)
    if reason is not None:
        raise RuntimeError(f"Triton backend unavailable: {reason}")


def check_float(name: str, t: torch.Tensor) -> None:
    """ValueError unless ``t`` is float32, float16 or bfloat16."""
    if t.dtype not in SUPPORTED_FLOATS:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()
