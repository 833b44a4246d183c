"""``fastguide train-classifier`` and ``fastguide train-diffusion``: the training configs' fields as flags,
ADM's architecture flags for the network; both run under torchrun for DDP (fastguide.train)."""

from __future__ import annotations

import argparse
import dataclasses
import re

from .args import add_dataclass_arguments


def add_train_command(sub, name: str, config_cls, help_text: str):
    parser = sub.add_parser(name, help=help_text, description=help_text)
    own = add_dataclass_arguments(parser, config_cls)
    flags_default = {f.name: f for f in dataclasses.fields(config_cls)}["model"].default
    flags_cls = type(flags_default)
    # the run decides image size, channels, classes and schedule; the rest are ADM's architecture flags
    decided = {"image_size", "in_channels", "num_classes", "noise_schedule", "diffusion_steps", "timestep_respacing"}
    arch = add_dataclass_arguments(parser, flags_cls, skip=decided | set(own))
    for a in parser._actions:
        if a.dest in arch:
            a.default = getattr(flags_default, a.dest)
            a.help = re.sub(r"\(default: .*\)$", f"(default: {a.default!r})", a.help)
    parser.set_defaults(_run=_train, _build=lambda ns: config_cls(
        **{k: getattr(ns, k) for k in own},
        model=dataclasses.replace(flags_default, **{k: getattr(ns, k) for k in arch}),
    ))  # fmt: skip
    return parser


def _train(args: argparse.Namespace) -> None:
    config = args._build(args)
    if args.command == "train-classifier":
        from ..train.tasks import train_classifier as run
    else:
        from ..train.tasks import train_diffusion as run
    run(config)
