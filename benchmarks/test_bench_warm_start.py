"""Cold and warm starts of the compiled step on the CPU (issue 26, point 3; its goal: a second process that
compiles the same networks and shapes samples within 10 s of its start).

Two fresh processes share one new compile cache folder (benchmarks/warm_start.py): the first compiles cold,
the second finds the first's artifacts, and must sample the same images bit for bit. Both are recorded
in extra_info. Quick mode (benchmarks/conftest.py):
adm64-tiny at batch 2 over DDIM-5, the goal not asserted.

Asserted in the full run: the warm start takes at most a fifth of the cold one, side by side (measured
0.10-0.11 on 2 cores of an AMD EPYC with AVX512-BF16 before the step store; without the AOT-autograd cache
it was 0.14; with the step store, fastguide/step_store.py, 0.06 at DDIM-5 on a Zen 3 EPYC without native
bf16). The 10-s goal is recorded (extra_info ``within_10_s``), not asserted: before the step store the
AVX512-BF16 machine measured 9.4, 10.6, 12.1 and 12.2 s in four runs within an hour (benchmarks/RESULTS.md),
so an assertion would fail by the machine's load, not by the code.
"""

from __future__ import annotations

import pytest
import torch

import warm_start

WARM_GOAL_S = 10.0  # issue 26's goal, recorded
WARM_SHARE_GOAL = 0.2  # asserted: warm start / cold start, side by side


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's start (on CUDA e2e reports compile time)")
def test_warm_start_against_a_cold_one(tagged_benchmark, quick):
    case, batch, respacing = ("adm64-tiny", 2, "ddim5") if quick else ("embedded", 16, "ddim25")
    rows = tagged_benchmark.pedantic(warm_start.starts, args=(case, batch, respacing), rounds=1, iterations=1)
    cold, warm = rows
    tagged_benchmark.extra_info.update(cold=cold, warm=warm, within_10_s=warm["first_step_s"] <= WARM_GOAL_S)
    print(f"\n{case} batch {batch} {respacing}: first step {cold['first_step_s']} s after the start cold, "
          f"{warm['first_step_s']} s warm (import {warm['import_s']} s)")  # fmt: skip
    assert warm["images_sha256"] == cold["images_sha256"], "the warm process sampled other images than the cold one"
    if not quick:
        share = warm["first_step_s"] / cold["first_step_s"]
        assert share <= WARM_SHARE_GOAL, (
            f"{case}: the warm process took {warm['first_step_s']} s to its first step, {share:.2f} of the cold "
            f"one's {cold['first_step_s']} s (goal {WARM_SHARE_GOAL})")
