"""Cold and warm starts of the compiled step on the CPU (issue 26, point 3): a second process that compiles
the same networks and shapes samples within 10 s of its start.

Two fresh processes share one new compile cache folder (benchmarks/warm_start.py): the first compiles cold,
the second finds the first's artifacts, and must sample the same images bit for bit. Both are recorded
in extra_info. Quick mode (benchmarks/conftest.py):
adm64-tiny at batch 2 over DDIM-5, the goal not asserted.
"""

from __future__ import annotations

import pytest
import torch

import warm_start

WARM_GOAL_S = 10.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's start (on CUDA the e2e benchmark reports compile time)")
def test_second_process_samples_within_ten_seconds(tagged_benchmark, quick):
    case, batch, respacing = ("adm64-tiny", 2, "ddim5") if quick else ("embedded", 16, "ddim25")
    rows = tagged_benchmark.pedantic(warm_start.starts, args=(case, batch, respacing), rounds=1, iterations=1)
    cold, warm = rows
    tagged_benchmark.extra_info.update(cold=cold, warm=warm)
    print(f"\n{case} batch {batch} {respacing}: first step {cold['first_step_s']} s after the start cold, "
          f"{warm['first_step_s']} s warm (import {warm['import_s']} s)")  # fmt: skip
    assert warm["images_sha256"] == cold["images_sha256"], "the warm process sampled other images than the cold one"
    if not quick:
        assert warm["first_step_s"] <= WARM_GOAL_S, (
            f"{case}: the warm process took {warm['first_step_s']} s to its first step (goal {WARM_GOAL_S} s)")
