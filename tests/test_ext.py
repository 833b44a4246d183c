"""The compiled extension fastguide._C: loading, both ops against the torch reference and float64,
input checks, torch.compile and opcheck, and an nvcc compile check of the CUDA sources.

The extension must be importable after ``pip install --no-build-isolation -e .``: these tests skip only
when FASTGUIDE_NO_EXT=1 was set (the extension is then neither built nor loaded), never silently.
Accuracy rule (tests/error_bounds.py, as for the Triton kernels): in every entry, an op's error against a
float64 evaluation of its formula on the same inputs is within the float32 rounding-error bound of that
formula at those values; the eager reference is held to the same bound. The rule does not depend on the CPU
or the thread count.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import fastguide
import fastguide as fg
from fastguide import _ext
from op_contract import UpdateOpContract, update_inputs
from fastguide.kernels.reference import (
    VARIANCE_CODES,
    guided_ddpm_update_ref,
    softmax_entropy_scale_ref,
)

ROOT = Path(__file__).resolve().parents[1]
NO_EXT = os.environ.get("FASTGUIDE_NO_EXT") == "1"
needs_ext = pytest.mark.skipif(NO_EXT, reason=f"FASTGUIDE_NO_EXT=1 is set: {_ext.REASON}")

VARIANCE_NAMES = {code: name for name, code in VARIANCE_CODES.items()}
SCHEDULE = fg.Schedule.create("linear", 1000, "250")
# ---- loading ----


@needs_ext
def test_extension_is_built_and_loaded():
    assert _ext.AVAILABLE, _ext.REASON
    assert _ext.REASON is None
    assert hasattr(torch.ops.fastguide, "guided_ddpm_update") and hasattr(torch.ops.fastguide, "guided_ddim_update")


def _probe_loader(name: str):
    """A fresh copy of fastguide/_ext.py run under the current (monkeypatched) environment."""
    spec = importlib.util.spec_from_file_location(f"fastguide._ext_probe_{name}", Path(_ext.__file__))
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # importing the loader must not warn
        spec.loader.exec_module(module)
    return module


class _RaisingFinder:
    """Meta-path finder that fails the import of fastguide._C like a module built for another torch."""

    def find_spec(self, name, path=None, target=None):
        if name == "fastguide._C":
            raise ImportError("fastguide/_C.so: undefined symbol: _ZN3c1015SmallVectorBaseIjE8grow_podEPKvmm")
        return None


def _hide_compiled_module(monkeypatch):
    monkeypatch.delitem(sys.modules, "fastguide._C", raising=False)
    monkeypatch.delattr(fastguide, "_C", raising=False)


@pytest.mark.parametrize("case", ["disabled", "not_built", "undefined_symbol", "other_torch_version"])
def test_loader_reports_why_the_extension_is_unavailable_and_warns_once(monkeypatch, case):
    if case == "disabled":
        monkeypatch.setenv("FASTGUIDE_NO_EXT", "1")
    else:
        monkeypatch.delenv("FASTGUIDE_NO_EXT", raising=False)
        _hide_compiled_module(monkeypatch)
        if case == "not_built":
            monkeypatch.setitem(sys.modules, "fastguide._C", None)  # import fails with ModuleNotFoundError
        elif case == "undefined_symbol":
            monkeypatch.setattr(sys, "meta_path", [_RaisingFinder(), *sys.meta_path])
        else:
            fake = types.SimpleNamespace(TORCH_VERSION="1.0.0+cpu", TORCH_HEADER_VERSION="1.0.0", WITH_CUDA=False)
            monkeypatch.setitem(sys.modules, "fastguide._C", fake)
            monkeypatch.setattr(fastguide, "_C", fake, raising=False)
    probe = _probe_loader(case)
    expected = {"disabled": "disabled", "not_built": "not built", "undefined_symbol": "built for another torch",
                "other_torch_version": "built for another torch"}[case]  # fmt: skip
    assert probe.REASON.startswith(expected), probe.REASON
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert probe.AVAILABLE is False
        assert probe.AVAILABLE is False
    assert [type(w.message) for w in caught] == [probe.ExtensionUnavailableWarning]
    assert probe.REASON in str(caught[0].message)
    with pytest.raises(RuntimeError, match=expected):
        probe.guided_ddim_update(*[torch.zeros(1)] * 7, 0.0, True, False)


# ---- inputs and oracles ----


# ---- the ops against the reference: the shared contract (op_contract.py) ----


@needs_ext
class TestExtUpdates(UpdateOpContract):
    """The C++ ops on the CPU."""

    ddpm = staticmethod(_ext.guided_ddpm_update)
    ddim = staticmethod(_ext.guided_ddim_update)


@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
class TestExtCudaUpdates(UpdateOpContract):
    """The CUDA kernels of the extension (a build with CUDA)."""

    device = "cuda"
    ddpm = staticmethod(_ext.guided_ddpm_update)
    ddim = staticmethod(_ext.guided_ddim_update)


def test_the_extension_refuses_the_entropy_op_and_forced_ext_dispatches_it_as_usual():
    """The extension implements only the updates, so the entropy contract (op_contract.EntropyOpContract) has
    no ext subclass: ops.explain gives ext's reason for refusing softmax_entropy_scale, and with ext forced
    the op goes to the backend automatic dispatch picks (torch, for CPU tensors), the reference's result."""
    logits, y = torch.randn(3, 7, generator=torch.Generator().manual_seed(0)), torch.tensor([6, 0, 2])
    assert "softmax_entropy_scale" not in fg.ops.EXT_OPS and not hasattr(_ext, "softmax_entropy_scale"), (
        "the extension has the entropy op now: run op_contract.EntropyOpContract on it")
    reason = dict(fg.ops.explain("softmax_entropy_scale", logits, y))["ext"]
    assert reason == ("the extension implements only the updates" if not NO_EXT
                      else f"the extension fastguide._C is unavailable: {_ext.REASON}")  # fmt: skip
    with fg.ops.use_backend("ext"):
        assert fg.ops.choose("softmax_entropy_scale", logits, y) == "torch"
        got = fg.ops.softmax_entropy_scale(logits, y, 2.0, 1e-6, 5.0)
    for a, b in zip(got, softmax_entropy_scale_ref(logits, y, 2.0, 1e-6, 5.0)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)



@needs_ext
def test_ddpm_update_propagates_nan_and_overflows_like_the_reference():
    variance = VARIANCE_CODES["learned"]
    x, eps, v, grad, scale, noise, coefs, nonzero = update_inputs((2, 1, 3, 4), torch.float32, variance)
    eps[0, 0, 0, 0] = float("nan")
    x[1, 0, 1, 1] = float("inf")
    v[0, 0, 2, :] = torch.tensor([100.0, -200.0, float("nan"), 80.0])  # log σ²: overflow, underflow, NaN
    args = (x, eps, v, grad, scale, noise, coefs, nonzero, variance, False)
    for got, ref in zip(_ext.guided_ddpm_update(*args), guided_ddpm_update_ref(*args)):
        torch.testing.assert_close(got, ref, equal_nan=True, rtol=1e-5, atol=1e-5)


@needs_ext
def test_fp64_is_refused_with_a_message_naming_the_dtype():
    x, eps, v, grad, scale, noise, coefs, nonzero = update_inputs((2, 3, 4, 4), torch.float64)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16, got Double"):
        _ext.guided_ddpm_update(x, eps, v, grad, scale, noise, coefs, nonzero, 0, True)


@needs_ext
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(eps=a["eps"][:, :2]), r"eps must have the shape of x \[2, 3, 4, 4\], got \[2, 2, 4, 4\]"),
        (lambda a: a.update(noise=a["noise"].half()), "noise must have the dtype of x"),
        (lambda a: a.update(scale=None), "grad and scale must both be given"),
        (lambda a: a.update(v=None), "variance learned_range needs v"),
        (lambda a: a.update(noise=None), "noise is required"),
        (lambda a: a.update(coefs=a["coefs"][:, :5]), r"coefs must have shape \[2, 11\]"),
        (lambda a: a.update(nonzero=torch.ones(3)), r"nonzero must have shape \[2\]"),
        (lambda a: a.update(x=a["x"][0]), "x must be \\(B, C, H, W\\)"),
        (lambda a: a.update(variance=7), "variance must be a code"),
        (lambda a: a.update(coefs=a["coefs"].long()), "coefs must be floating point"),
    ],
    ids=["shape", "dtype", "guidance pair", "missing v", "missing noise", "coefs", "nonzero", "rank", "variance",
         "coefs dtype"],  # fmt: skip
)
def test_ddpm_update_checks_itsupdate_inputs(change, message):
    names = ("x", "eps", "v", "grad", "scale", "noise", "coefs", "nonzero")
    args = dict(zip(names, update_inputs((2, 3, 4, 4), torch.float32)), variance=0, clip_denoised=True)
    change(args)
    with pytest.raises(RuntimeError, match=message):
        _ext.guided_ddpm_update(**args)


@needs_ext
def test_ddim_update_checks_eta_and_noise():
    x, eps, _, grad, scale, noise, coefs, nonzero = update_inputs((2, 3, 4, 4), torch.float32)
    with pytest.raises(RuntimeError, match="eta must be finite and >= 0"):
        _ext.guided_ddim_update(x, eps, grad, scale, noise, coefs, nonzero, -0.5, True, False)
    with pytest.raises(RuntimeError, match="noise is required when eta > 0"):
        _ext.guided_ddim_update(x, eps, grad, scale, None, coefs, nonzero, 0.5, True, False)


# ---- torch.compile and torch.library ----


def _ddpm_step(x, eps, v, grad, scale, noise, coefs, nonzero):
    return torch.ops.fastguide.guided_ddpm_update(x, eps, v, grad, scale, noise, coefs, nonzero, 0, True)


def _ddim_step_with_torch_around(x, eps, grad, scale, coefs, index):
    nonzero = (index != 0).float()  # plain torch ops before and after: the op must sit inside one graph
    x_prev, x0 = torch.ops.fastguide.guided_ddim_update(x, eps, grad, scale * 2, None, coefs, nonzero, 0.0, True, False)
    return x_prev.clamp(-5, 5), x0


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@needs_ext
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_ddpm_step_has_no_graph_break_and_matches_eager():
    """inductor (the op alone compiles no C++, so this stays cheap); fullgraph raises on a break."""
    args = update_inputs((4, 3, 8, 8), torch.float32)
    compiled = torch.compile(_ddpm_step, fullgraph=True, backend="inductor")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for shift in (0.0, 1.0):  # a second call with new values must not recompile
            step_args = (args[0] + shift, *args[1:])
            for got, want in zip(compiled(*step_args), _ddpm_step(*step_args)):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch._dynamo.explain(_ddpm_step)(*args).graph_break_count == 0


@needs_ext
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_ddim_step_with_torch_ops_around_matches_eager():
    """aot_eager: traces the op with its fake implementation among other ops, without inductor's C++ compile."""
    x, eps, _, grad, scale, _, coefs, _ = update_inputs((3, 3, 5, 7), torch.float32)
    index = torch.tensor([0, 7, 249])
    compiled = torch.compile(_ddim_step_with_torch_around, fullgraph=True, backend="aot_eager")
    got = compiled(x, eps, grad, scale, coefs, index)
    for g, w in zip(got, _ddim_step_with_torch_around(x, eps, grad, scale, coefs, index)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("guided", [True, False], ids=["guided", "unguided"])
def test_opcheck_ddpm(guided):
    x, eps, v, grad, scale, noise, coefs, nonzero = update_inputs((2, 3, 5, 4), torch.float32)
    if not guided:
        grad = scale = None
    torch.library.opcheck(
        torch.ops.fastguide.guided_ddpm_update.default, (x, eps, v, grad, scale, noise, coefs, nonzero, 0, True)
    )


@needs_ext
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_opcheck_ddim(eta):
    x, eps, _, grad, scale, noise, coefs, nonzero = update_inputs((2, 3, 5, 4), torch.float32, layout="channels_last")
    torch.library.opcheck(
        torch.ops.fastguide.guided_ddim_update.default,
        (x, eps, grad, scale, noise if eta else None, coefs, nonzero, eta, True, False),
    )


# ---- CUDA sources: compile only ----

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA sources cannot be compile-checked")


def _nvcc(source: str, out: Path, *extra: str) -> None:
    from torch.utils.cpp_extension import include_paths

    cmd = [NVCC, "-c", str(ROOT / source), "-o", str(out), "-std=c++17", *extra]
    cmd += [f"-I{p}" for p in include_paths()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"


@needs_nvcc
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    """csrc/ops_cuda.cu, the kernels, includes only CUDA headers and csrc/, so it compiles anywhere nvcc does."""
    _nvcc("csrc/ops_cuda.cu", tmp_path / "ops_cuda.o")


@needs_nvcc
def test_cuda_launcher_compiles_against_torch_headers(tmp_path):
    """csrc/ops_cuda.cpp, the torch-side launcher, with the CUDA include path nvcc adds.

    A CPU torch wheel ships c10/cuda's headers without the one CMake generates
    (c10/cuda/impl/cuda_cmake_macros.h); a stand-in for it is enough to compile-check the launcher.
    """
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "stub"
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths()):
        (stub / "c10/cuda/impl").mkdir(parents=True)
        (stub / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    _nvcc("csrc/ops_cuda.cpp", tmp_path / "ops_cuda_launcher.o", f"-I{stub}", "-w")


# ---- CUDA: run the kernels where there is a GPU and a CUDA build ----


