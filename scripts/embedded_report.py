"""The embedded UNets' samples as an independent eye sees them (issue 14): grids and image statistics.

For each UNet (cond, uncond; embedded names or run folders) × {unguided, guided (ECT classifier, EDS
at each --gammas γ; default: `fastguide sample`'s γ for that UNet)} × {DDIM-25, DDPM-250}: N samples
per digit (labels i mod 10 in class order, seeds i), a grid PNG in --out, and one table row: the share
of non-black backgrounds (fastguide.evaluation.nonblack_background), mean intensity (reference: the
held-out digits), and the ResNet evaluation network's class accuracy (of unguided UADM: against
arbitrary labels). The table is printed as Markdown and written to --out/report.md.

    OMP_NUM_THREADS=1 python scripts/embedded_report.py --out docs/embedded --count 10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import fastguide as fg
from fastguide.cli.sample import default_gamma
from fastguide.evaluation import eval_network, mean_intensity, nonblack_background, reference_images
from fastguide.generate import generate, load_networks, make_sampler
from fastguide.plots import save_grid

SAMPLERS = {"ddim-25": ("ddim", "ddim25"), "ddpm-250": ("ddpm", "250")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=10, help="samples per digit")
    p.add_argument("--models", default="cond,uncond")
    p.add_argument("--samplers", default="ddim-25,ddpm-250")
    p.add_argument("--gammas", default=None,
                   help="comma-separated EDS γ of the guided runs (default: fastguide sample's for each UNet)")
    p.add_argument("--guided_only", action="store_true", help="no unguided rows")
    args = p.parse_args()
    gammas = None if args.gammas is None else [float(g) for g in args.gammas.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    judge = eval_network("resnet")
    reference = mean_intensity(reference_images())
    labels = [c for c in range(10) for _ in range(args.count)]
    seeds = list(range(len(labels)))
    rows = ["| model | sampler | guidance | non-black | mean intensity | ResNet class acc | seconds |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for model in args.models.split(","):
        nets = load_networks(model, "ect")
        runs = [] if args.guided_only else [("none", fg.NoGuidance())]
        for gamma in gammas or [default_gamma(nets.flags.class_cond)]:
            runs.append((f"eds γ={gamma:g}", fg.EntropyDriven(gamma)))
        for sampler_name in args.samplers.split(","):
            method, respacing = SAMPLERS[sampler_name]
            for guidance, policy in runs:
                start = time.perf_counter()
                sampler = make_sampler(nets, policy, method, respacing)
                gen = generate(sampler, labels, seeds, batch_size=50, device=torch.device("cpu"), progress=False)
                seconds = time.perf_counter() - start
                _, probs = judge(gen.images)
                accuracy = float((probs.argmax(axis=1) == gen.labels).mean())
                tag = "none" if guidance == "none" else f"eds{policy.gamma:g}"
                name = f"{Path(model).name}_{sampler_name}_{tag}.png"
                save_grid(args.out / name, gen.images, gen.labels)
                row = (f"| {model} | {sampler_name} | {guidance} | {nonblack_background(gen.images):.3f} | "
                       f"{mean_intensity(gen.images):.3f} (ref {reference:.3f}) | {accuracy:.3f} | {seconds:.0f} |")  # fmt: skip
                rows.append(row)
                print(row, flush=True)
    text = "\n".join(rows) + "\n"
    (args.out / "report.md").write_text(text)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
