"""Compare the EMA and the plain weights of a finished UNet run by the quality of unguided samples.

    OMP_NUM_THREADS=1 python3 scripts/compare_weights.py runs/cadm

200 samples (labels i mod 10, seeds i), DDIM-25, unguided, scored by fastguide's evaluator (embedded
evaluation network, held-out split). Prints one JSON line per weight set.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fastguide.evaluation import Evaluator
from fastguide.generate import Networks, generate, make_sampler
from fastguide.guidance import NoGuidance
from fastguide.pretrained import load_run, run_flags


def main() -> None:
    run = Path(sys.argv[1])
    evaluator = Evaluator()
    labels, seeds = [i % 10 for i in range(200)], list(range(200))
    for weights in ("ema", "model"):
        nets = Networks(load_run(run, weights=weights), None, run_flags(run))
        sampler = make_sampler(nets, NoGuidance(), "ddim", "ddim25")
        gen = generate(sampler, labels, seeds, 100, torch.device("cpu"), progress=False)
        scores = evaluator(gen.images, gen.labels).as_dict()
        print(run.name, weights, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}))


if __name__ == "__main__":
    main()
