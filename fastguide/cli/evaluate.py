"""``fastguide evaluate``: FID, sFID, IS, precision/recall and class accuracy of an ADM .npz of samples."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..files import atomic_write, check_output_folder


def add_evaluate_command(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="FID, IS, precision/recall (k=3) and class accuracy of an ADM .npz of samples.",
        description="Scores samples (ADM .npz: arr_0 uint8 NHWC, optional arr_1 labels) against the held-out "
        "MNIST 5k split in the embedded evaluation network's feature space, or in Inception-v3's with --inception.",
    )
    p.add_argument("samples", help="ADM-format .npz of samples")
    p.add_argument("--ref", default=None,
                   help="reference .npz instead of the held-out MNIST 5k split: arr_0 images and/or ADM's precomputed "
                   "mu, sigma, mu_s, sigma_s (ADM's reference batches)")  # fmt: skip
    from ..evaluation import DEFAULT_EVAL_NET, EVAL_NETS

    p.add_argument("--eval_net", default=DEFAULT_EVAL_NET, choices=sorted(EVAL_NETS),
                   help="the evaluation network: class-accuracy judge, and the feature space without --inception "
                   f"(default: {DEFAULT_EVAL_NET}; eval-unet: the earlier one, of the guidance classifiers' family)")  # fmt: skip
    p.add_argument("--sfid", action=argparse.BooleanOptionalAction, default=True,
                   help="also compute sFID (spatial features; default: on)")  # fmt: skip
    p.add_argument("--inception", default=None,
                   help="TorchScript Inception-v3 file (inception-2015-12-05.pt, StyleGAN2-ADA/EDM format) "
                   "for ImageNet-comparable FID/IS/precision/recall")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    p.set_defaults(_run=run_evaluate)


def run_evaluate(args) -> None:
    from ..evaluation import Evaluator, check_samples, load_npz, load_reference
    from ..generate import resolve_device

    images, labels = load_npz(args.samples)
    check_samples(images, labels)
    ref = None if args.ref is None else load_reference(args.ref)
    device = resolve_device(args.device)
    if args.json is not None:
        if Path(args.json).is_dir():
            raise ValueError(f"--json {args.json!r} is a folder; give a file name")
        check_output_folder(Path(args.json).parent)
    evaluator = Evaluator(ref, args.inception, device, spatial=args.sfid, eval_net=args.eval_net)
    evaluator.check(images, labels)
    print("Computing evaluations...", flush=True)  # ADM's evaluator's lines, as it prints them: this first
    scores = evaluator(images, labels)
    for line in evaluator.adm_summary(scores):
        print(line)
    print()  # then every score
    for key, value in scores.as_dict().items():
        print(f"{key:16s} {value:.4f}" if isinstance(value, float) else f"{key:16s} {value}")
    if args.json is not None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(scores.as_dict(), indent=1) + "\n"))
