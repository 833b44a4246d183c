"""Test-wide setup: without CUDA, Triton kernels run in Triton's CPU interpreter.

The interpreter is read when Triton is first imported, so this is set before any test module loads.
Automatic dispatch never picks the interpreter; tests that want it force FASTGUIDE_BACKEND=triton.

``precision="auto"`` picks bfloat16 on a CPU with native bf16 (fastguide.cpu.bf16_kind): the tests pin the
CPU kind to "none" (float32), so that their numbers do not depend on the CPU they run on (subprocesses
inherit it); the tests of the automatic choice set the kind they test.

The README runs the tests in parallel (pytest-xdist, ``-n auto``): one worker per CPU the process may use
(``pytest_xdist_auto_num_workers``), each with its share of the CPUs as torch's thread count, set before
torch loads and handed to subprocesses through ``OMP_NUM_THREADS``, so that the workers never oversubscribe
the cores (two processes at two threads each on two cores are several times slower than one). No test
depends on the thread count: the numerical ones bound their error by float64 references.

Shared fixtures: ``checkpoints`` (adm-sample's networks as ADM checkpoints, used by test_adm_sample.py,
test_cli_properties.py and test_faults_at_every_write.py).
"""

import os
import sys

import pytest

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
SHARE = max(1, CPUS // WORKERS)  # a worker's threads (the module docstring)
if WORKERS > 1:  # a worker of pytest-xdist
    os.environ["OMP_NUM_THREADS"] = str(SHARE)

import torch  # noqa: E402  (after OMP_NUM_THREADS)

if WORKERS > 1:
    torch.set_num_threads(SHARE)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FASTGUIDE_CPU_BF16"] = "none"


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per CPU this process may use (xdist would count physical cores where psutil is
    installed, one on a 2-vCPU machine with SMT)."""
    return CPUS


_WORKERS_WORST: dict = {}  # the parity report of each xdist worker, gathered by the controller


def pytest_sessionfinish(session):
    """An xdist worker hands its parity report to the controller (``pytest_testnodedown``)."""
    parity = sys.modules.get("golden_cases")
    if hasattr(session.config, "workeroutput") and parity is not None:
        session.config.workeroutput["parity_worst"] = dict(parity.WORST)


def pytest_testnodedown(node, error):
    _WORKERS_WORST.update(getattr(node, "workeroutput", {}).get("parity_worst", {}))


def pytest_terminal_summary(terminalreporter):
    """The float64 parity tests' worst case: fastguide's error against float64, as a share of what the rule
    allows (2 × the float32 reference's error + 1e-6) and as a ratio to the reference's error."""
    parity = sys.modules.get("golden_cases")  # the float64 rule of tests/golden_cases.py, if a test used it
    worst = {**_WORKERS_WORST, **(parity.WORST if parity is not None else {})}
    if not worst:
        return
    test, (used, ratio, what) = max(worst.items(), key=lambda item: item[1][0])
    terminalreporter.write_line(
        f"float64 parity ({len(worst)} tests): worst case {what} in {test}: error = {ratio:.2f} ×"
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
