"""Test-wide setup: without CUDA, Triton kernels run in Triton's CPU interpreter.

The interpreter is read when Triton is first imported, so this is set before any test module loads.
Automatic dispatch never picks the interpreter; tests that want it force FASTGUIDE_BACKEND=triton.

``precision="auto"`` picks bfloat16 on a CPU with native bf16 (fastguide.cpu.bf16_kind): the tests pin the
CPU kind to "none" (float32), so that their numbers do not depend on the CPU they run on (subprocesses
inherit it); the tests of the automatic choice set the kind they test.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FASTGUIDE_CPU_BF16"] = "none"


def pytest_terminal_summary(terminalreporter):
    """The float64 parity tests' worst case: fastguide's error against float64, as a share of what the rule
    allows (2 × the float32 reference's error + 1e-6) and as a ratio to the reference's error."""
    parity = sys.modules.get("test_adm_parity")
    if parity is None or not parity.WORST:
        return
    test, (used, ratio, what) = max(parity.WORST.items(), key=lambda item: item[1][0])
    terminalreporter.write_line(
        f"float64 parity ({len(parity.WORST)} tests): worst case {what} in {test}: error = {ratio:.2f} ×"
        f" the float32 reference's, {used:.0%} of the allowed 2 × + 1e-6"
    )
