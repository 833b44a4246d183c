"""Shared benchmark harness: every result is tagged with device, torch version and commit."""

import subprocess

import pytest
import torch


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@pytest.fixture
def tagged_benchmark(benchmark):
    """pytest-benchmark's fixture with device/torch/commit recorded in extra_info."""
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        torch=torch.__version__,
        commit=_commit(),
        threads=torch.get_num_threads(),
    )
    return benchmark
