"""Test-wide setup: without CUDA, Triton kernels run in Triton's CPU interpreter.

The interpreter is read when Triton is first imported, so this is set before any test module loads.
Automatic dispatch never picks the interpreter; tests that want it force FASTGUIDE_BACKEND=triton.

``precision="auto"`` picks bfloat16 on a CPU with native bf16 (fastguide.cpu.bf16_kind): the tests pin the
CPU kind to "none" (float32), so that their numbers do not depend on the CPU they run on (subprocesses
inherit it); the tests of the automatic choice set the kind they test.

Shared fixtures: ``checkpoints`` (adm-sample's networks as ADM checkpoints, used by test_adm_sample.py,
test_cli_properties.py and test_faults_at_every_write.py).
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FASTGUIDE_CPU_BF16"] = "none"


def pytest_terminal_summary(terminalreporter):
    """The float64 parity tests' worst case: fastguide's error against float64, as a share of what the rule
    allows (2 × the float32 reference's error + 1e-6) and as a ratio to the reference's error."""
    parity = sys.modules.get("golden_cases")  # the float64 rule of tests/golden_cases.py, if a test used it
    if parity is None or not parity.WORST:
        return
    test, (used, ratio, what) = max(parity.WORST.items(), key=lambda item: item[1][0])
    terminalreporter.write_line(
        f"float64 parity ({len(parity.WORST)} tests): worst case {what} in {test}: error = {ratio:.2f} ×"
        f" the float32 reference's, {used:.0%} of the allowed 2 × + 1e-6"
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """ADM-format checkpoints of the FLAGS networks, made by ADM's own code where it is installed."""
    from adm_reference import MISSING
    from adm_sample_support import FLAGS, adm_build

    from fastguide.adm.flags import parse_flags

    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    if MISSING is None:
        _, unet, _, classifier = adm_build(" ".join(FLAGS))
    else:
        flags = parse_flags(FLAGS)
        unet, classifier = flags.model.build(), flags.classifier.build()
    torch.save(unet.state_dict(), folder / "model.pt")
    torch.save(classifier.state_dict(), folder / "classifier.pt")
    return ["--model_path", str(folder / "model.pt"), "--classifier_path", str(folder / "classifier.pt")]
