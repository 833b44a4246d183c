"""End-to-end guided sampling against ADM's own loop, and the speed goals of the fast path.

Run with ``pytest benchmarks/test_bench_e2e.py --benchmark-only``. The contenders (benchmarks/e2e.py) run
side by side in one process, alternating, from the same x_T with the same weights; the goals are ratios
of their steady-state medians (compile time is reported beside them, in extra_info).

Goals (issue 12): on CPU, the fast path ≥ 1.6× ADM's loop at batch 16 on the embedded models and on a
scaled-down ADM-64. On an H100/H200: ADM-256 at batch 16 ≥ 3× ADM's fp16 loop and ≥ 60% of the bf16
FLOP floor, ADM-64 ≥ 5×, batch-1 latency ≥ 4× (these run where CUDA is available).
"""

from __future__ import annotations

import pytest
import torch

import e2e

CPU_GOAL = 1.6
GPU_GOALS = {("adm256", 16): 3.0, ("adm64", 16): 5.0, ("adm256", 1): 4.0}
FLOOR_GOAL = 0.60


def _record(benchmark, timings: dict[str, e2e.Timing], baseline: str) -> dict[str, float]:
    """Every contender's numbers into the benchmark's extra_info; returns speedups over ``baseline``."""
    speedups = {name: timings[baseline].median_s / t.median_s for name, t in timings.items()}
    for name, t in timings.items():
        benchmark.extra_info[name] = dict(
            ms_per_step=round(t.ms_per_step, 2), images_per_s=round(t.images_per_s, 3), compile_s=round(t.compile_s, 1),
            peak_mb=round(t.peak_mb or 0, 1), speedup=round(speedups[name], 3),
        )  # fmt: skip
    return speedups


@pytest.mark.parametrize("case, respacing", [("embedded", "ddim25"), ("adm64-small", "ddim10")])
def test_cpu_fast_path_against_adms_loop(tagged_benchmark, case, respacing):
    runs, x_T, y, steps = e2e.setup(case, 16, "ddim", respacing, "cpu", ("adm", "adm-style", "eager", "fast"))
    timings = e2e.time_side_by_side(runs, x_T, y, steps, rounds=3)
    baseline = "adm" if "adm" in timings else "adm-style"
    speedups = _record(tagged_benchmark, timings, baseline)
    fast = timings["fast"]
    tagged_benchmark.pedantic(runs["fast"], args=(x_T, y), rounds=1)  # the row: one more fast-path run
    assert speedups["fast"] >= CPU_GOAL, (
        f"{case}: fast path {fast.ms_per_step:.1f} ms/step is {speedups['fast']:.2f}x {baseline}'s "
        f"{timings[baseline].ms_per_step:.1f} ms/step (goal {CPU_GOAL}x)"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case, batch", sorted(GPU_GOALS))
def test_gpu_fast_path_against_adms_fp16_loop(tagged_benchmark, case, batch):
    runs, x_T, y, steps = e2e.setup(case, batch, "ddim", "ddim25", "cuda", ("adm", "eager", "fast"))
    timings = e2e.time_side_by_side(runs, x_T, y, steps, rounds=3)
    speedups = _record(tagged_benchmark, timings, "adm")
    tagged_benchmark.pedantic(runs["fast"], args=(x_T, y), rounds=1)
    flops = e2e.step_flops(e2e.cases()[case], batch, torch.device("cuda"))
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in e2e.BF16_PEAK_TFLOPS.items() if k in name), None)
    floor = 1000 * flops / (peak * 1e12) / timings["fast"].ms_per_step if peak else None
    tagged_benchmark.extra_info["bf16_floor_share"] = floor
    assert speedups["fast"] >= GPU_GOALS[case, batch], f"{case} batch {batch}: {speedups['fast']:.2f}x ADM's fp16 loop"
    if case == "adm256" and batch >= 16 and floor is not None:
        assert floor >= FLOOR_GOAL, f"adm256 batch {batch}: {floor:.0%} of the bf16 FLOP floor"
