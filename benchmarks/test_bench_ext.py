"""The C++ batched guided step (fastguide._C, CPU) against the eager torch chain it replaces.

Run with ``pytest benchmarks/test_bench_ext.py --benchmark-only``. The eager chain is the test oracle,
``fastguide.kernels.reference.guided_*_update_ref``, so benchmark and tests never drift apart.

Issue 4's CPU target is asserted here: at batch 8×3×64×64 (learned_range variance, guided,
clip_denoised; DDIM likewise) the C++ step's median time is at least 3× below the eager chain's,
both timed in the same test, in alternation, with the same inputs and threads. Quick mode
(benchmarks/conftest.py) times each once and checks the C++ step against the chain, not the speedup.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

import fastguide as fg
from fastguide import _ext
from fastguide.kernels.reference import (
    VARIANCE_CODES,
    guided_ddim_update_ref,
    guided_ddpm_update_ref,
)

SPEEDUP_TARGET = 3.0  # issue 4: C++ batched step ≥ 3× faster than the eager chain on CPU
SHAPE = (8, 3, 64, 64)
ROUNDS, WARMUP = 200, 20

pytestmark = pytest.mark.skipif(
    os.environ.get("FASTGUIDE_NO_EXT") == "1", reason=f"FASTGUIDE_NO_EXT=1 is set: {_ext.REASON}"
)


def _step_args(op: str) -> tuple:
    """Inputs of one guided step whose 8 samples sit at 8 different timesteps."""
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 3, 17, 60, 101, 150, 203, 249])
    coefs = fg.Schedule.create("linear", 1000, "250").coefficients(index)
    nonzero = (index != 0).float()
    x, eps, grad, noise = (torch.randn(SHAPE, generator=g) for _ in range(4))
    v = torch.rand(SHAPE, generator=g) * 2 - 1
    scale = torch.rand(SHAPE[0], generator=g) * 5 + 1
    if op == "ddpm":
        return x, eps, v, grad, scale, noise, coefs, nonzero, VARIANCE_CODES["learned_range"], True
    return x, eps, grad, scale, noise, coefs, nonzero, 0.5, True, False  # eta 0.5: the noise path too


CALLS = {
    "ddpm": (_ext.guided_ddpm_update, guided_ddpm_update_ref),
    "ddim": (_ext.guided_ddim_update, guided_ddim_update_ref),
}


def _interleaved_medians(*fns, rounds: int = ROUNDS, warmup: int = WARMUP) -> list[float]:
    """Median seconds per call of each fn, timed in alternation so that all see the same machine load."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


@pytest.mark.parametrize("op", ["ddpm", "ddim"])
def test_eager_chain_8x3x64x64(tagged_benchmark, op):
    """The baseline, for the table: the reference's eager torch ops."""
    args = _step_args(op)
    ref = CALLS[op][1]
    out = tagged_benchmark.pedantic(lambda: ref(*args), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert torch.isfinite(out[0]).all()


@pytest.mark.parametrize("op", ["ddpm", "ddim"])
def test_ext_step_8x3x64x64_at_least_3x_faster_than_eager(tagged_benchmark, op, quick):
    args = _step_args(op)
    fused, ref = CALLS[op]
    for got, want in zip(fused(*args), ref(*args)):  # same step, to float32 rounding
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-4)
    tagged_benchmark.pedantic(lambda: fused(*args), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    rounds = dict(rounds=1, warmup=0) if quick else {}
    eager_s, fused_s = _interleaved_medians(lambda: ref(*args), lambda: fused(*args), **rounds)
    speedup = eager_s / fused_s
    tagged_benchmark.extra_info.update(
        eager_median_us=round(eager_s * 1e6, 1), ext_median_us=round(fused_s * 1e6, 1), speedup=round(speedup, 2)
    )
    if not quick:
        assert speedup >= SPEEDUP_TARGET, (
            f"{op}: C++ step median {fused_s * 1e6:.0f} µs vs eager {eager_s * 1e6:.0f} µs is {speedup:.2f}×, "
            f"below the {SPEEDUP_TARGET}× target"
        )
