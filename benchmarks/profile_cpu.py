"""Where the guided step's time goes on the CPU, phase by phase, against this machine's measured peaks.

    python benchmarks/profile_cpu.py [--cases embedded,adm64-small] [--batches 1,16] [--respacing ddim25]
                                      [--no-compiled]

Prints a Markdown block for benchmarks/RESULTS.md (issue 26, point 1):

* the peaks, timed in the same run: a 2048³ GEMM and a 3×3 convolution (128 channels, 16×32×32, NCHW and
  channels-last), in float32 and bf16;
* per case and batch, in float32 and in bf16 (autocast), each phase timed alone on the same inputs: the UNet
  forward (no grad), the classifier forward, its input-gradient backward (forward + backward, less the
  forward), softmax→entropy→scale; with each phase's FLOPs (torch.utils.flop_counter) and achieved rate;
* the whole step of GuidedSampler (eager float32, eager bf16 and, unless ``--no-compiled``, compiled with
  the precision ``"auto"`` picks: bf16 on a CPU with native bf16, else float32)
  and of ADM's own loop, from DDIM-25 loops timed side by side (benchmarks/e2e.py); "rest" is the step less
  the phases above: the update, the copies and the casts.

Time it on a quiet machine: a second process at 2 threads on 2 cores makes every figure 5–20× worse.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402

import fastguide as fg  # noqa: E402


def timed(fn, rounds: int = 5, warmup: int = 2, budget_s: float = 5.0) -> float:
    """Median seconds of ``fn()`` over ``rounds`` calls after ``warmup`` calls; fewer (at least one of
    each) where a call is slow enough that they would take more than ``budget_s``."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(min(warmup - 1, int(budget_s / max(first, 1e-9)))):
        fn()
    times = []
    for _ in range(max(1, min(rounds, int(budget_s / max(first, 1e-9))))):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peaks() -> dict[str, float]:
    """GFLOP/s of a large GEMM (2048³; 512³ in bf16 where the CPU has no native bf16) and of one 3×3
    convolution, float32 and bf16 (and channels-last)."""
    out = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        n = 2048 if dtype == torch.float32 or fg.cpu.native_bf16() else 512  # emulated bf16 is ~100x slower
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out[f"GEMM {n}³ {name}"] = 2 * n**3 / timed(lambda: a @ b) / 1e9
        for layout in ("NCHW", "channels-last"):
            x = torch.randn(16, 128, 32, 32, dtype=dtype)
            w = torch.randn(128, 128, 3, 3, dtype=dtype)
            if layout == "channels-last":
                x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
            work = 2 * 16 * 128 * 128 * 9 * 32 * 32
            out[f"conv 3×3 128ch 16×32×32 {layout} {name}"] = work / timed(lambda: F.conv2d(x, w, padding=1)) / 1e9
    return out


def phases(case: e2e.Case, batch: int, precision: str) -> list[tuple[str, float, int]]:
    """(phase, seconds, FLOPs) of each phase of one guided step, timed alone."""
    unet, clf = e2e.networks(case, torch.device("cpu"))
    clf.requires_grad_(False)  # as the sampler runs it: no weight gradient
    size, c = case.unet.image_size, case.unet.in_channels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, size, size, generator=g)
    t = torch.full((batch,), 500)
    y = torch.arange(batch) % case.classifier.num_classes

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def unet_forward():
        with torch.no_grad(), autocast():
            return unet(x, t, y=y) if case.unet.class_cond else unet(x, t)

    def classifier_forward():
        with autocast():
            return clf(x.detach().requires_grad_(True), t)

    def forward_backward():
        x_in = x.detach().requires_grad_(True)
        with autocast():
            logits = clf(x_in, t)
        picked = F.log_softmax(logits.float(), -1).gather(1, y[:, None]).sum()
        picked.backward()  # the input gradient only: the parameters are frozen (autograd.grad would do the
        return x_in.grad  # same work, but FlopCounterMode's module hooks refuse it on a leaf input)

    logits = classifier_forward().detach().float()
    rows = []
    for name, fn in (("UNet forward", unet_forward), ("classifier forward", classifier_forward),
                     ("classifier fwd+bwd", forward_backward),
                     ("softmax→entropy→scale", lambda: fg.ops.softmax_entropy_scale(logits, y, 1.0))):  # fmt: skip
        rows.append((name, timed(fn), flops(fn)))
    fwd, both = rows[1], rows[2]
    rows[2] = ("classifier input-gradient backward", both[1] - fwd[1], both[2] - fwd[2])
    return rows


def whole_steps(case_name: str, batch: int, compiled: bool, respacing: str = "ddim25") -> dict[str, tuple]:
    """(seconds per step, first call's extra seconds) of DDIM loops (``respacing``) timed side by side: ADM's,
    GuidedSampler eager fp32/bf16 and compiled (with the precision "auto" picks; its first call compiles)."""
    case = e2e.cases()[case_name]
    cpu = torch.device("cpu")
    unet, clf = e2e.networks(case, cpu)
    runs = e2e.contenders(case, "ddim", respacing, cpu, ("adm",))
    runs["eager fp32"] = e2e.fastguide_loop(case, "ddim", respacing, unet, clf, compile=False)
    runs["eager bf16"] = e2e.fastguide_loop(case, "ddim", respacing, unet, clf, compile=False, precision="bfloat16")
    if compiled:  # with the precision "auto" picks on this CPU
        auto = "bf16" if fg.cpu.native_bf16() else "fp32"
        runs[f"compiled {auto}"] = e2e.fastguide_loop(case, "ddim", respacing, unet, clf, compile=True,
                                                       precision="auto")
    _, x_T, y, steps = e2e.setup(case_name, batch, "ddim", respacing, "cpu", ())
    timings = e2e.time_side_by_side(runs, x_T, y, steps, rounds=2)
    return {name: (statistics.median(tm.runs_s) / steps, tm.compile_s) for name, tm in timings.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="embedded,adm64-small")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--respacing", default="ddim25",
                   help="the DDIM loops of the whole-step rows (a step costs the same in a shorter loop)")
    p.add_argument("--no-compiled", dest="compiled", action="store_false", help="leave out the compiled step")
    args = p.parse_args()
    torch.manual_seed(0)
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    kind = fg.cpu.bf16_kind()
    print(f"### CPU profile: {model} ({kind}), {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    peak = peaks()
    print("| peak | GFLOP/s |\n| --- | ---: |")
    for name, rate in peak.items():
        print(f"| {name} | {rate:.0f} |")
    # the reference: the fastest convolution measured, bf16 where the CPU has native bf16 (float32 elsewhere)
    best_conv, conv_peak = max(((k, v) for k, v in peak.items() if k.startswith("conv")), key=lambda kv: kv[1])
    print(f"\nReference peak for the rates below: {best_conv}, {conv_peak:.0f} GFLOP/s.")
    for case_name in args.cases.split(","):
        case = e2e.cases()[case_name]
        for batch in (int(b) for b in args.batches.split(",")):
            print(f"\n#### {case_name}, batch {batch}\n")
            print("| phase | precision | ms | GFLOP | GFLOP/s | % of conv peak |\n| --- | --- | ---: | ---: | ---: | ---: |")
            phase_s, phase_flops = {}, {}
            for precision in ("fp32", "bf16"):
                rows = phases(case, batch, precision)
                phase_s[precision] = sum(s for _, s, _ in rows)
                phase_flops[precision] = sum(n for _, _, n in rows)  # the step's: UNet, classifier fwd and bwd
                for name, s, n in rows:
                    rate = n / s / 1e9 if s > 0 else float("nan")
                    print(f"| {name} | {precision} | {s * 1e3:.2f} | {n / 1e9:.3f} | {rate:.0f} | {100 * rate / conv_peak:.0f}% |")
            total = phase_flops["fp32"]
            steps = whole_steps(case_name, batch, args.compiled, args.respacing)
            print("\n| whole step | ms | × ADM | GFLOP/s | % of conv peak | rest (update, copies, casts) ms |"
                  " first call's extra s |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")  # fmt: skip
            for name, (s, first) in steps.items():
                rest = {"eager fp32": phase_s["fp32"], "eager bf16": phase_s["bf16"]}.get(name)
                rest_ms = f"{(s - rest) * 1e3:.1f}" if rest is not None else "–"
                rate = total / s / 1e9
                print(f"| {name} | {s * 1e3:.1f} | {steps['adm'][0] / s:.2f} | {rate:.0f} | {100 * rate / conv_peak:.0f}% "
                      f"| {rest_ms} | {first:.1f} |")  # fmt: skip
    print(f"\nCommand: `python benchmarks/profile_cpu.py --cases {args.cases} --batches {args.batches}"
          f" --respacing {args.respacing}{'' if args.compiled else ' --no-compiled'}`")  # fmt: skip


if __name__ == "__main__":
    main()
