"""The CPU's floating-point mode and what its vector units can do.

Training small convolutional networks on x86 CPUs spends time on denormal (subnormal) floats: a
training step (batch 32) of the embedded class-conditional UNet ran at 52 img/s with denormals and at
69 img/s with them flushed to zero (2 cores, idle machine). Flushing changes only values below
1.2e-38 in magnitude.

bfloat16 pays on a CPU only where it has native bf16 instructions: AMX-BF16 (Intel Sapphire Rapids and
later) or AVX512-BF16 (Intel Cooper Lake, AMD Zen 4 and later). Elsewhere oneDNN converts to float32 and
back around every operation, and bf16 networks run slower than float32 ones (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager

import torch

AMX_BF16, AVX512_BF16, NO_NATIVE_BF16 = "AMX-BF16", "AVX512-BF16", "no native bf16"


KIND_ENV = "FASTGUIDE_CPU_BF16"  # overrides the detection: amx-bf16, avx512-bf16 or none
_KIND_NAMES = {"amx-bf16": AMX_BF16, "avx512-bf16": AVX512_BF16, "none": NO_NATIVE_BF16}


def bf16_kind() -> str:
    """What this CPU has for bfloat16 arithmetic: :data:`AMX_BF16`, :data:`AVX512_BF16` or
    :data:`NO_NATIVE_BF16`, from torch's CPU feature checks (else /proc/cpuinfo), unless the environment
    variable ``FASTGUIDE_CPU_BF16`` names one (``amx-bf16``, ``avx512-bf16``, ``none``: ``none`` keeps
    ``precision="auto"`` at float32 on any CPU).

    Raises:
        ValueError: ``FASTGUIDE_CPU_BF16`` holds another value.
    """
    forced = os.environ.get(KIND_ENV, "").strip()
    if forced:
        if forced.lower() not in _KIND_NAMES:
            raise ValueError(f"{KIND_ENV}={forced!r}: expected one of {sorted(_KIND_NAMES)}")
        return _KIND_NAMES[forced.lower()]
    return _detected_kind()


@functools.cache
def _detected_kind() -> str:
    checks = getattr(torch, "cpu", None)
    amx, avx512 = getattr(checks, "_is_amx_tile_supported", None), getattr(checks, "_is_avx512_bf16_supported", None)
    if amx is not None and avx512 is not None:  # AMX tiles come with AMX-BF16 on every CPU that has them
        flags = ({"amx_bf16"} if amx() else set()) | ({"avx512_bf16"} if avx512() else set())
    else:
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(next((line for line in f if line.startswith("flags")), "").split())
        except OSError:
            flags = set()
    if "amx_bf16" in flags:
        return AMX_BF16
    return AVX512_BF16 if "avx512_bf16" in flags else NO_NATIVE_BF16


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX-BF16 or AVX512-BF16)."""
    return bf16_kind() != NO_NATIVE_BF16


def denormals_flushed() -> bool:
    """Whether this thread's CPU float ops treat denormals as zero now (torch has no getter: a denormal
    doubled reads back as zero only when flushed)."""
    return (torch.tensor([1e-39], dtype=torch.float32) * 2).item() == 0


@contextmanager
def flush_denormals(enabled: bool = True):
    """Within the block, CPU float ops treat denormals as zero (FTZ/DAZ); the mode before it is restored
    after (a block inside another flushing block leaves it flushing)."""
    if not enabled:
        yield
        return
    before = denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
