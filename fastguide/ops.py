"""The fused ops of the guided step and the one place that chooses a backend for them.

Ops (contracts in :mod:`fastguide.kernels.reference`): ``softmax_entropy_scale``,
``guided_ddpm_update``, ``guided_ddim_update``.

Backends, in priority order:

* ``ext``: the compiled extension ``fastguide._C`` (C++ with OpenMP on CPU, CUDA on GPU); serves the
  two updates.
* ``triton``: the Triton kernels in :mod:`fastguide.kernels`; serves all three ops on CUDA tensors.
  On CPU tensors Triton only runs in its interpreter (``TRITON_INTERPRET=1``), a debugging and
  testing tool that automatic dispatch never picks; forcing ``triton`` uses it.
* ``torch``: the pure-torch references; serves everything.

Each backend says why it cannot serve a given call; ``FASTGUIDE_BACKEND=torch|triton|ext`` forces
one, and when the forced backend cannot serve, the error lists why. (``ext`` does not implement
``softmax_entropy_scale``; with ``ext`` forced, that op is dispatched as usual.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

ENV = "FASTGUIDE_BACKEND"
PRIORITY = ("ext", "triton", "torch")
OPS = ("softmax_entropy_scale", "guided_ddpm_update", "guided_ddim_update")


class BackendUnavailable(RuntimeError):
    """No backend (or not the forced one) can serve a call; the message lists every reason."""


def _tensors(args) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor)]


def _torch_impl(op: str) -> Callable:
    from .kernels import reference

    return getattr(reference, f"{op}_ref")


def _torch_refusal(op: str, tensors: list[torch.Tensor], forced: bool) -> str | None:
    return None


def _triton_impl(op: str) -> Callable:
    if op == "softmax_entropy_scale":
        from .kernels.triton_entropy import softmax_entropy_scale_triton

        return softmax_entropy_scale_triton
    from .kernels import triton_update

    return getattr(triton_update, f"{op}_triton")


def _triton_refusal(op: str, tensors: list[torch.Tensor], forced: bool) -> str | None:
    if not forced and any(t.device.type == "cpu" for t in tensors):
        return "CPU tensors run Triton only in its interpreter, which automatic dispatch never picks"
    if op != "softmax_entropy_scale" and tensors and tensors[0].shape[0] > TRITON_MAX_BATCH:
        return f"batch {tensors[0].shape[0]} exceeds the {TRITON_MAX_BATCH} programs of the kernels' grid axis 1"
    try:
        from .kernels.triton_common import triton_refusal
    except ImportError as err:  # pragma: no cover - the module ships with the package
        return f"Triton kernels cannot be imported ({err})"
    return triton_refusal(*tensors)


def _ext_impl(op: str) -> Callable:
    from . import _ext

    return getattr(_ext, op)


def _ext_refusal(op: str, tensors: list[torch.Tensor], forced: bool) -> str | None:
    try:
        from . import _ext
    except ImportError as err:  # pragma: no cover - the loader ships with the package
        return f"the extension loader cannot be imported ({err})"

    if not _ext.AVAILABLE:
        return f"the extension fastguide._C is unavailable: {_ext.REASON}"
    if op not in EXT_OPS:
        return "the extension implements only the updates"
    devices = {t.device.type for t in tensors}
    if not devices <= {"cpu", "cuda"}:
        return f"tensors on {sorted(devices)}; the extension runs on CPU and CUDA"
    if "cuda" in devices and not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastguide::{op}", "CUDA"):
        return "the extension was built without CUDA"
    x = tensors[0]
    if x.dtype not in _EXT_DTYPES:
        return f"images of dtype {x.dtype}; the extension takes {sorted(str(d) for d in _EXT_DTYPES)}"
    images = [t for t in tensors if t.dim() == 4]
    if any(t.dtype != x.dtype for t in images):
        return f"image tensors of mixed dtypes {sorted({str(t.dtype) for t in images})}; the extension needs one"
    return None


TRITON_MAX_BATCH = 65535  # the update kernels put the batch on CUDA grid axis 1
_EXT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
EXT_OPS = ("guided_ddpm_update", "guided_ddim_update")  # the extension does not implement the entropy op


_BACKENDS = {
    "ext": (_ext_refusal, _ext_impl),
    "triton": (_triton_refusal, _triton_impl),
    "torch": (_torch_refusal, _torch_impl),
}


def forced_backend() -> str | None:
    """The backend named by FASTGUIDE_BACKEND, or None; an unknown name is an error."""
    name = os.environ.get(ENV, "").strip()
    if not name:
        return None
    if name not in _BACKENDS:
        raise ValueError(f"{ENV}={name!r} is not a backend; choose one of {list(PRIORITY)}")
    return name


def explain(op: str, *args) -> list[tuple[str, str | None]]:
    """For each backend in priority order, why it cannot serve ``op(*args)`` (None: it can)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    forced = forced_backend()
    tensors = _tensors(args)
    return [(name, _BACKENDS[name][0](op, tensors, forced == name)) for name in PRIORITY]


def choose(op: str, *args) -> str:
    """The backend that will serve ``op(*args)``.

    Raises:
        BackendUnavailable: the forced backend cannot serve the call (the message says why).
    """
    forced = forced_backend()
    reasons = explain(op, *args)
    if forced == "ext" and op not in EXT_OPS:
        forced = None  # an op the forced backend does not implement at all is dispatched as usual
    if forced is not None:
        reason = dict(reasons)[forced]
        if reason is not None:
            raise BackendUnavailable(f"{ENV}={forced} cannot serve {op}: {reason}")
        return forced
    for name, reason in reasons:
        if reason is None:
            return name
    raise BackendUnavailable(f"no backend can serve {op}: " + "; ".join(f"{n}: {r}" for n, r in reasons))


def resolve(op: str, *args) -> Callable:
    """The implementation :func:`choose` picks for calls like ``op(*args)``, to call directly from then on
    (the sampler resolves its ops once, so that a compiled step holds no dispatch logic)."""
    return _BACKENDS[choose(op, *args)][1](op)


def call(op: str, *args):
    """Run ``op(*args)`` on the backend :func:`choose` picks."""
    return resolve(op, *args)(*args)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend inside a ``with`` block (sets FASTGUIDE_BACKEND; None: automatic)."""
    old = os.environ.get(ENV)
    if name is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = name
    try:
        forced_backend()
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def softmax_entropy_scale(logits, y, gamma=1.0, entropy_floor=1e-6, max_scale=0.0):
    """log p(y), H, EDS scale and d log p(y)/d logits in one pass (see fastguide.kernels.reference)."""
    return call("softmax_entropy_scale", logits, y, gamma, entropy_floor, max_scale)


def _per_sample(value: torch.Tensor | None) -> torch.Tensor | None:
    """(B,) float32 view of a per-sample input given as (B,), (B,1,1,1), bool or any float dtype."""
    return None if value is None else value.reshape(-1).float()


def guided_ddpm_update(x, eps, v, grad, scale, noise, coefs, nonzero, variance, clip_denoised):
    """The fused guided DDPM update (see fastguide.kernels.reference)."""
    scale, nonzero, coefs = _per_sample(scale), _per_sample(nonzero), coefs.float()
    return call("guided_ddpm_update", x, eps, v, grad, scale, noise, coefs, nonzero, variance, clip_denoised)


def guided_ddim_update(x, eps, grad, scale, noise, coefs, nonzero, eta, clip_denoised, paper_form):
    """The fused guided DDIM update (see fastguide.kernels.reference)."""
    scale, nonzero, coefs = _per_sample(scale), _per_sample(nonzero), coefs.float()
    return call("guided_ddim_update", x, eps, grad, scale, noise, coefs, nonzero, eta, clip_denoised, paper_form)
