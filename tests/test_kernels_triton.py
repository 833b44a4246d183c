"""Triton kernels against the torch references, and both against float64.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton and the
kernel modules are imported); with CUDA they are compiled and run on the GPU.

Tolerance rule: in every entry, a kernel's error against the float64 result of the op's formula is at most
the float32 rounding-error bound of that formula at those values (tests/error_bounds.py: each operation's
rounding, carried through the formula, so that cancellation such as x̂0 = r·x − q·ε near t = T gets the
error it must have). The eager torch reference is held to the same bound, which checks the bound. Unlike
"twice the eager error", the rule does not depend on the CPU (vector width, FMA contraction) or the thread
count; test_error_rule_fails_* show that it still fails a kernel whose coefficient is off by 1e-5.
"""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by triton.jit when the kernels are decorated

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from fastguide.kernels.reference import softmax_entropy_scale_ref  # noqa: E402
from fastguide.kernels.triton_common import is_interpreted, next_power_of_2, triton_refusal  # noqa: E402
from fastguide.kernels.triton_entropy import (  # noqa: E402
    MAX_BLOCK_K,
    _softmax_entropy_scale_kernel,
    launch_softmax_entropy_scale,
    softmax_entropy_scale_triton,
)
from fastguide.kernels.triton_update import (  # noqa: E402
    guided_ddim_update_triton,
    guided_ddpm_update_triton,
    launch_guided_ddim_update,
    launch_guided_ddpm_update,
)
from error_bounds import assert_within_bound, softmax_entropy_bound  # noqa: E402
from op_contract import EntropyOpContract, UpdateOpContract, update_inputs  # noqa: E402

if DEVICE == "cpu" and not is_interpreted(_softmax_entropy_scale_kernel):
    pytest.skip(
        "the Triton kernels were imported before TRITON_INTERPRET=1 was set, so they cannot run on CPU",
        allow_module_level=True,
    )

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INF = math.inf


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed)).to(DEVICE, dtype)


# ---------------------------------------------------------------- softmax–entropy–scale


def check_entropy(logits, y, gamma=1.0, entropy_floor=1e-6, max_scale=0.0, block_k=None):
    """Kernel and eager reference both within the float32 rounding-error bound of the formula (against
    float64, error_bounds), and close to each other; returns the kernel's output and worst ratios."""
    out = launch_softmax_entropy_scale(logits, y, gamma, entropy_floor, max_scale, block_k)
    ref = softmax_entropy_scale_ref(logits, y, gamma, entropy_floor, max_scale)
    K = logits.shape[1]
    blocks = -(-K // (block_k or min(next_power_of_2(K), MAX_BLOCK_K)))
    exact = softmax_entropy_bound(logits, y, gamma, entropy_floor, max_scale, blocks)
    ratios = {}
    for name, k, e, x in zip(ref._fields, out, ref, exact):
        assert k.dtype == torch.float32 and k.shape == e.shape, name
        torch.testing.assert_close(k, e, equal_nan=True, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        assert_within_bound(f"reference {name}", e, x)
        ratios[name] = assert_within_bound(name, k, x)
    return out, ratios


class TestTritonEntropy(EntropyOpContract):
    """The shared contract of softmax–entropy–scale (op_contract.py) on the Triton kernel, in its default
    blocks of up to MAX_BLOCK_K classes (the tests below choose other blocks)."""

    op = staticmethod(softmax_entropy_scale_triton)
    backend = "triton"
    device = DEVICE
    block_k = MAX_BLOCK_K


# Triton's own: the online softmax over small blocks of classes (edge cases at block boundaries), and its
# input checks (float64 and no classes refused; labels are not checked on the host).


@pytest.mark.parametrize("block_k", [2, 16, 64])
def test_entropy_loops_over_blocks_of_classes(block_k):
    logits, y = _randn(9, 41, seed=3) * 3, torch.arange(9, device=DEVICE) * 4
    out, _ = check_entropy(logits, y, block_k=block_k)
    single = softmax_entropy_scale_triton(logits, y)  # one block of 64
    for a, b in zip(out, single):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_entropy_extreme_logits(dtype):
    big = torch.finfo(torch.float16).max  # 65504 (bf16 rounds it to 65536)
    logits = torch.tensor(
        [
            [-INF, 0.0, 1.0, -INF, 2.0],
            [1e4, -1e4, 0.0, 1e4, -1e4],
            [big, -big, 0.0, big, 1.0],
            [-INF, -INF, -INF, 3.0, -INF],  # one finite class: p = 1, H = 0
            [-1e4, -1e4, -1e4, -1e4, -1e4],
        ]
    ).to(DEVICE, dtype)
    y = torch.tensor([0, 1, 2, 3, 4], device=DEVICE)  # row 0 asks for a class with p = 0: log p = −inf
    out, _ = check_entropy(logits, y, gamma=1.0, entropy_floor=1e-3, max_scale=50.0, block_k=2)
    assert out.log_prob[0].item() == -INF and out.log_prob[3].item() == 0.0
    assert out.entropy[3].item() == 0.0 and out.scale[3].item() == 50.0  # floored, then capped
    assert out.dlogits[0, 0].item() == 1.0 and out.dlogits[0, 3].item() == 0.0
    assert torch.isfinite(out.entropy).all() and torch.isfinite(out.dlogits).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nan_at", [0, 17, 40])  # first block, middle, tail of the last block
def test_entropy_propagates_nan_to_its_row_only(nan_at, dtype):
    logits = _randn(4, 41, seed=5) * 3
    logits[1, 3] = 50.0  # the row's max is elsewhere: a NaN-dropping max would hide the NaN
    logits[1, nan_at] = math.nan
    logits = logits.to(dtype)
    out, _ = check_entropy(logits, torch.tensor([0, 1, 2, 3], device=DEVICE), block_k=16)
    for field in out:
        assert field[1].isnan().all() and not field[[0, 2, 3]].isnan().any()


def test_entropy_label_outside_the_classes_gives_nan_log_prob():
    out = softmax_entropy_scale_triton(_randn(2, 5), torch.tensor([1, 5], device=DEVICE))
    assert not out.log_prob[0].isnan() and out.log_prob[1].isnan()  # no host sync to check labels


@pytest.mark.parametrize(
    "logits, y, match",
    [
        (torch.zeros(5), torch.zeros(5, dtype=torch.long), r"\(B, K\).*\(5,\)"),
        (torch.zeros(2, 5), torch.zeros(3, dtype=torch.long), r"\(2, 5\) and \(3,\)"),
        (torch.zeros(2, 0), torch.zeros(2, dtype=torch.long), "no classes"),
        (torch.zeros(2, 5, dtype=torch.float64), torch.zeros(2, dtype=torch.long), "float64"),
        (torch.zeros(2, 5), torch.zeros(2), "labels must be int32 or int64, got torch.float32"),
    ],
)
def test_entropy_rejects_bad_inputs_with_a_clear_message(logits, y, match):
    with pytest.raises(ValueError, match=match):
        softmax_entropy_scale_triton(logits.to(DEVICE), y.to(DEVICE))


# ---------------------------------------------------------------- guided DDPM and DDIM updates

class TestTritonUpdates(UpdateOpContract):
    """The shared contract of the updates (op_contract.py) on the Triton kernels."""

    ddpm = staticmethod(guided_ddpm_update_triton)
    ddim = staticmethod(guided_ddim_update_triton)
    device = DEVICE


def inputs(shape=(3, 3, 7, 5), dtype=torch.float32, variance=0):
    return update_inputs(shape, dtype, variance, device=DEVICE)


@pytest.mark.parametrize("block", [8, 64])
def test_updates_mask_the_tail_of_the_last_block(block):
    x, eps, v, grad, scale, noise, coefs, nonzero = inputs()  # 105 pixels per sample
    ddpm = (x, eps, v, grad, scale, noise, coefs, nonzero, 0, True)
    for a, b in zip(launch_guided_ddpm_update(*ddpm, block=block), guided_ddpm_update_triton(*ddpm)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    ddim = (x, eps, grad, scale, noise, coefs, nonzero, 1.0, True, False)
    for a, b in zip(launch_guided_ddim_update(*ddim, block=block), guided_ddim_update_triton(*ddim)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def _bad_update_calls():
    x, eps, v, grad, scale, noise, coefs, nonzero = inputs()
    ddpm = dict(x=x, eps=eps, v=v, grad=grad, scale=scale, noise=noise, coefs=coefs, nonzero=nonzero,
                variance=0, clip_denoised=True)  # fmt: skip
    ddim = dict(x=x, eps=eps, grad=grad, scale=scale, noise=noise, coefs=coefs, nonzero=nonzero, eta=0.5,
                clip_denoised=True, paper_form=False)  # fmt: skip
    D, I = guided_ddpm_update_triton, guided_ddim_update_triton  # noqa: E741
    return [
        (D, {**ddpm, "eps": eps[:, :2]}, r"eps has shape \(3, 2, 7, 5\), expected x's shape \(3, 3, 7, 5\)"),
        (D, {**ddpm, "x": x.double(), "eps": eps.double()}, "x must be float32, float16 or bfloat16, got .*float64"),
        (D, {**ddpm, "noise": noise.double()}, "noise must be .*got torch.float64"),
        (D, {**ddpm, "x": x[0]}, r"x must be \(B, C, H, W\), got shape \(3, 7, 5\)"),
        (D, {**ddpm, "coefs": coefs[:, :5]}, r"coefs has shape \(3, 5\), expected \(3, 11\)"),
        (D, {**ddpm, "scale": scale[:2]}, r"scale has shape \(2,\), expected \(3,\)"),
        (D, {**ddpm, "variance": 7}, "unknown variance code 7"),
        (D, {**ddpm, "v": None}, "learned variances need v"),
        (D, {**ddpm, "scale": None}, "grad and scale must both be given"),
        (I, {**ddim, "noise": None}, "eta = 0.5 > 0 needs noise"),
        (I, {**ddim, "eta": -1.0}, "eta must be >= 0"),
        (I, {**ddim, "nonzero": nonzero.long()}, "nonzero must be a floating tensor"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_updates_reject_bad_inputs_with_a_clear_message(case):
    fn, kwargs, match = _bad_update_calls()[case]
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)


# ---------------------------------------------------------------- backend refusal, import and compilation


def test_refusal_names_the_reason():
    x = torch.zeros(2, 3, device=DEVICE)
    assert triton_refusal(x, None, torch.zeros(2, dtype=torch.long, device=DEVICE)) is None
    assert "float64" in triton_refusal(x.double())
    assert "meta" in triton_refusal(torch.zeros(2, device="meta"))
    if DEVICE == "cpu":
        assert "TRITON_INTERPRET=1" in triton_refusal(x, kernel=object())  # a kernel built for the GPU


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def test_kernel_modules_import_without_triton_and_refuse_with_the_reason():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from fastguide.kernels import triton_entropy, triton_update\n"
        "from fastguide.kernels.triton_common import triton_refusal\n"
        "print(triton_refusal(torch.zeros(1)))\n"
        "try:\n"
        "    triton_entropy.softmax_entropy_scale_triton(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("triton is not importable (")
    assert lines[1].startswith("Triton backend unavailable: triton is not importable")


def test_kernels_compile_for_a_gpu_without_one(tmp_path):
    """Compile only (TTIR → cubin for sm_90), so that a kernel the interpreter accepts but the compiler
    rejects cannot land; needs triton's NVIDIA backend (ptxas ships with it), no GPU."""
    pytest.importorskip("triton.backends.nvidia")
    code = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastguide.kernels import triton_entropy as te, triton_update as tu

def compile(kernel, pointers, ints, floats, **constexprs):
    types = {**pointers, **{n: "i32" for n in ints}, **{n: "fp32" for n in floats}}
    types.update({n: "constexpr" for n in constexprs})
    sig = {n: types[n] for n in kernel.arg_names}  # in argument order
    triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", 90, 32))

outs = {n: "*fp32" for n in ("log_prob_ptr", "entropy_ptr", "scale_ptr", "dlogits_ptr")}
compile(te._softmax_entropy_scale_kernel, {"logits_ptr": "*fp16", "labels_ptr": "*i64", **outs},
        ["K", "stride_lb", "stride_lk", "stride_y", "stride_db"], ["numerator", "entropy_floor", "max_scale"],
        BLOCK_K=4096)
images = ("x_ptr", "eps_ptr", "grad_ptr", "noise_ptr", "x_prev_ptr", "xstart_ptr")
rows = {n: "*fp32" for n in ("scale_ptr", "coefs_ptr", "nonzero_ptr")}
strides = ["stride_x", "stride_eps", "stride_grad", "stride_noise", "stride_scale", "stride_cb", "stride_cc",
           "stride_nz", "stride_out"]
for variance in range(4):
    compile(tu._guided_ddpm_update_kernel, {**{n: "*bf16" for n in images + ("v_ptr",)}, **rows},
            ["N", "stride_v"] + strides, [], VARIANCE=variance, GUIDED=variance < 2, CLIP=True, BLOCK=1024,
            **tu._COLUMNS)
compile(tu._guided_ddim_update_kernel, {**{n: "*fp16" for n in images}, **rows}, ["N"] + strides, ["eta"],
        GUIDED=True, PAPER_FORM=False, CLIP=True, HAS_NOISE=True, BLOCK=1024, **tu._COLUMNS)
print("compiled")
"""
    result = _python(code, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("triton's ptxas is not available")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
