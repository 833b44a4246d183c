"""Cold and warm starts of the compiled step: how long a fresh process takes until it samples.

    python benchmarks/warm_start.py [--case embedded] [--batch 16] [--respacing ddim25]

Runs the same child twice, each a new Python process with the same, initially empty, compile cache folder
(``TORCHINDUCTOR_CACHE_DIR``; the child sees what a user's process sees). The child imports fastguide,
builds the case's sampler with ``SamplerConfig(compile=True)`` and the precision ``"auto"`` picks, and
samples one batch; it reports the seconds from its start (before ``import torch``) until its first step
has returned (the import, the networks, the trace and compilation or the cache's loading, one step) and
the steady time of a whole sample, and a digest of its images (the warm process must sample
what the cold one sampled). The first child starts cold, the second warm. Prints one JSON line per
child; ``benchmarks/test_bench_warm_start.py`` asserts the warm start.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before torch is imported: the child's whole start counts

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402


def child(case_name: str, batch: int, respacing: str) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import e2e

    import fastguide as fg

    imported = time.perf_counter() - START
    case = e2e.cases()[case_name]
    unet, clf = e2e.networks(case, torch.device("cpu"))
    sampler = fg.GuidedSampler(unet, clf, case.unet.schedule(respacing), fg.EntropyDriven(case.scale),
                               fg.SamplerConfig(compile=True, precision="auto"))  # fmt: skip
    labels = [i % case.unet.num_classes for i in range(batch)]
    built = time.perf_counter() - START
    steps = sampler.steps(labels, seeds=list(range(batch)))
    next(steps)  # the first step: traced and compiled, or loaded from the cache
    first_step = time.perf_counter() - START
    for _ in steps:
        pass
    start = time.perf_counter()
    images = sampler.sample(labels, seeds=list(range(batch))).images
    return dict(case=case_name, batch=batch, respacing=respacing, bf16_kind=fg.cpu.bf16_kind(),
                import_s=round(imported, 2), built_s=round(built, 2), first_step_s=round(first_step, 2),
                sample_s=round(time.perf_counter() - start, 2),
                images_sha256=hashlib.sha256(images.numpy().tobytes()).hexdigest())  # fmt: skip


def starts(case_name: str, batch: int, respacing: str, cache_dir: str | None = None) -> list[dict]:
    """[cold, warm]: the child run twice with one compile cache folder (a new one unless ``cache_dir``)."""
    with tempfile.TemporaryDirectory(prefix="fastguide-warm-start-") as fresh:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir or fresh}
        command = [sys.executable, os.path.abspath(__file__), "--child", "--case", case_name, "--batch", str(batch),
                   "--respacing", respacing]  # fmt: skip
        return [json.loads(subprocess.run(command, env=env, check=True, capture_output=True, text=True)
                           .stdout.strip().splitlines()[-1]) for _ in range(2)]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="embedded")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--respacing", default="ddim25")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.case, args.batch, args.respacing)))
        return
    for name, row in zip(("cold", "warm"), starts(args.case, args.batch, args.respacing)):
        print(json.dumps({"start": name, **row}))


if __name__ == "__main__":
    main()
