"""What `fastguide reproduce`'s scores are for real digits: the floor of its metrics and their noise at 150 samples.

Scores DRAWS disjoint sets of N real training digits (the UNets' own training images, N/10 of each class,
labelled with their own class) with `fastguide evaluate`'s evaluator against the 500 held-out digits, exactly
as a grid run's 150 samples are scored. The mean is what a perfect generator of the training set would get;
the spread is how much a score moves between two sample sets of the same generator, which is the noise
below which two grid rows are not told apart.

    python scripts/real_floor.py --out docs/results/real_floor.md     # ~1 min on one core
"""

import argparse
import sys

import numpy as np

from fastguide.evaluation import DEFAULT_EVAL_NET, EVAL_NETS, Evaluator
from fastguide.files import atomic_write
from fastguide.train.data import mnist5k

METRICS = ("fid", "precision", "recall", "class_accuracy", "nonblack_background", "mean_intensity")


def draws(labels: np.ndarray, per_class: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` disjoint index sets, ``per_class`` of each class in each (a random order within each class)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    order = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    need = per_class * count
    short = [int(c) for c in classes if len(order[c]) < need]
    if short:
        raise ValueError(f"{count} disjoint draws of {per_class} per class need {need} images of each class; "
                         f"class {short[0]} has {len(order[short[0]])}")  # fmt: skip
    return [np.concatenate([order[c][i * per_class : (i + 1) * per_class] for c in classes]) for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_samples", type=int, default=150, help="digits per draw, a multiple of 10 (default 150)")
    p.add_argument("--draws", type=int, default=20, help="disjoint draws (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_net", default=DEFAULT_EVAL_NET, choices=sorted(EVAL_NETS))
    p.add_argument("--out", default=None, help="write the table here as markdown (default: print it)")
    args = p.parse_args(argv)
    if args.num_samples < 10 or args.num_samples % 10:
        p.error(f"--num_samples must be a positive multiple of 10, got {args.num_samples}")
    if args.draws < 2:
        p.error(f"--draws must be at least 2 (a spread needs two), got {args.draws}")
    train = mnist5k("train")
    images = train.pixels.permute(0, 2, 3, 1).numpy()
    labels = train.labels.numpy()
    try:
        sets = draws(labels, args.num_samples // 10, args.draws, args.seed)
    except ValueError as e:
        p.error(str(e))
    evaluator = Evaluator(eval_net=args.eval_net)
    scores = np.array([[evaluator(images[s], labels[s]).as_dict()[m] for m in METRICS] for s in sets], dtype=float)
    lines = [
        f"{args.draws} disjoint draws of {args.num_samples} real MNIST 5k training digits, scored against the 500 "
        f"held-out digits by the `{args.eval_net}` evaluation network (seed {args.seed}; `python "
        f"scripts/real_floor.py --num_samples {args.num_samples} --draws {args.draws} --seed {args.seed} "
        f"--eval_net {args.eval_net}`):",
        "",
        "| metric | mean | sd | min | max |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, column in zip(METRICS, scores.T):
        lines.append(f"| {name} | {column.mean():.4g} | {column.std(ddof=1):.3g} | {column.min():.4g} | "
                     f"{column.max():.4g} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    if args.out:
        atomic_write(args.out, lambda tmp: tmp.write_text(text))
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
