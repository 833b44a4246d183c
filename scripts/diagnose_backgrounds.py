"""Where the grey backgrounds of the embedded UNets' samples come from (issue 14).

For a UNet (embedded name or run folder), unguided, 200 samples (labels i mod 10, seeds i): the share of
samples whose 4-pixel frame is not black (fastguide.evaluation.nonblack_background) for DDIM-25 with eta 0
and 1, DDIM-100 and DDPM-250; the correlation of the frame's brightness with the mean of x_T; and DDIM-25
from the same x_T with its mean removed.

    OMP_NUM_THREADS=2 python scripts/diagnose_backgrounds.py --model cond
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

import fastguide as fg
from fastguide.evaluation import frame_brightness, nonblack_background
from fastguide.generate import MODELS, load_networks, make_sampler, run_dir
from fastguide.noise import PerSampleNoise
from fastguide.pretrained import load_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cond", help="cond | uncond (embedded) or a training run folder")
    p.add_argument("--weights", default="auto", help="auto | ema | model (run folders)")
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--samplers", default="ddim25,ddim25-eta1,ddim100,ddpm250,centred",
                   help="which of ddim25, ddim25-eta1, ddim100, ddpm250, centred to run (comma-separated)")
    args = p.parse_args()
    nets = load_networks(args.model, None)
    if args.model not in MODELS and args.weights != "auto":
        nets = dataclasses.replace(nets, model=load_run(run_dir(args.model, MODELS, "--model"), args.weights))
    labels, seeds = [i % 10 for i in range(args.n)], list(range(args.n))
    flags = nets.flags
    x_T = PerSampleNoise(seeds, (flags.in_channels, flags.image_size, flags.image_size)).initial()
    chosen = set(args.samplers.split(","))
    runs = {"ddim25": ("ddim", "ddim25", 0.0), "ddim25-eta1": ("ddim", "ddim25", 1.0),
            "ddim100": ("ddim", "ddim100", 0.0), "ddpm250": ("ddpm", "250", 0.0)}  # fmt: skip
    for method, respacing, eta in (run for name, run in runs.items() if name in chosen):
        images = make_sampler(nets, fg.NoGuidance(), method, respacing, eta=eta).sample(labels, seeds=seeds).images
        u = fg.to_uint8(images).numpy()
        b, share = frame_brightness(u), nonblack_background(u)
        corr = np.corrcoef(x_T.mean(dim=(1, 2, 3)).numpy(), b)[0, 1]
        print(f"{method} {respacing} eta {eta:g}: non-black {share:.3f}, corr(mean of x_T, frame) {corr:+.2f}", flush=True)
    if "centred" not in chosen:
        return
    sampler = make_sampler(nets, fg.NoGuidance(), "ddim", "ddim25")
    centred = sampler.sample(labels, noise=fg.FixedNoise(x_T - x_T.mean(dim=(1, 2, 3), keepdim=True))).images
    print(f"ddim ddim25, x_T with its mean removed: non-black {nonblack_background(fg.to_uint8(centred).numpy()):.3f}")


if __name__ == "__main__":
    main()
