"""Shared benchmark harness: every result is tagged with device, torch version and commit.

Quick mode, ``FASTGUIDE_BENCH_QUICK=1 python3 -m pytest benchmarks/ --benchmark-only -q`` (``.ci/run`` runs
it): every benchmark runs its code path once, at small sizes (fewer samples, steps and rounds), each timed
call a single round, and the speed assertions (ratios, time limits) are skipped; the correctness
assertions are kept. Without it (the default, and what benchmarks/RESULTS.md reports) the sizes, rounds
and speed goals are the full ones. Benchmarks read the mode from the ``quick`` fixture.
"""

import os
import subprocess

import pytest
import torch

QUICK = os.environ.get("FASTGUIDE_BENCH_QUICK", "").strip() not in ("", "0")


def pytest_report_header(config):
    if QUICK:
        return "fastguide benchmarks: quick mode (FASTGUIDE_BENCH_QUICK): small sizes, one round, no speed asserts"
    return None


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@pytest.fixture
def quick() -> bool:
    """True in quick mode (``FASTGUIDE_BENCH_QUICK=1``): small sizes, one round, no speed assertions."""
    return QUICK


class _OneRound:
    """pytest-benchmark's fixture with every timed call run once (one round, one iteration, no warm-up)."""

    def __init__(self, benchmark):
        self._benchmark = benchmark

    def __getattr__(self, name):
        return getattr(self._benchmark, name)

    def __call__(self, fn, *args, **kwargs):
        return self._benchmark.pedantic(fn, args=args, kwargs=kwargs, rounds=1, iterations=1)

    def pedantic(self, fn, *args, **kwargs):
        kwargs.update(rounds=1, iterations=1, warmup_rounds=0)
        return self._benchmark.pedantic(fn, *args, **kwargs)


@pytest.fixture
def tagged_benchmark(benchmark):
    """pytest-benchmark's fixture with device/torch/commit recorded in extra_info (in quick mode, one round)."""
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        torch=torch.__version__,
        commit=_commit(),
        threads=torch.get_num_threads(),
        quick=QUICK,
    )
    return _OneRound(benchmark) if QUICK else benchmark
