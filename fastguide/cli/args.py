"""What more than one subcommand's arguments share: config dataclasses as flags (every field becomes
``--field_name``, with the field's comment as its help text), the fast-path and guidance-schedule flags, and
the checks that run before any work."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
from collections.abc import Sequence

from ..cpu import bf16_kind
from ..solvers import names

_COMMENT = re.compile(r"^\s+(\w+):[^#]*#\s*(.+)$")


def _field_help(cls) -> dict[str, str]:
    """The one-line comment of every dataclass field, from the source of the class and its bases."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for line in inspect.getsource(klass).splitlines():
                m = _COMMENT.match(line)
                if m:
                    helps[m.group(1)] = m.group(2)
    return helps


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_TYPES = {"int": int, "float": float, "str": str, "bool": _parse_bool}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: Sequence[str] = ()) -> list[str]:
    """Add ``--name`` for every field of ``cls`` not in ``skip``; returns the names added."""
    helps, names = _field_help(cls), []
    for f in dataclasses.fields(cls):
        kind = str(f.type)
        if f.name in skip or kind not in _TYPES:
            continue
        default = f.default
        parser.add_argument(
            f"--{f.name}",
            type=_TYPES[kind],
            default=default,
            metavar=kind.upper(),
            help=f"{helps.get(f.name, f.name)} (default: {default!r})",
        )
        names.append(f.name)
    return names


def add_fast_path_arguments(p: argparse.ArgumentParser) -> None:
    """--compile/--no-compile and --precision (SamplerConfig.compile and .precision)."""
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the whole guided step with torch.compile (default: on CUDA; on a CPU with native "
                   "bf16 when the run is long enough to repay a cold compile, a minute or more (fastguide.cost); "
                   "else eager)")  # fmt: skip
    p.add_argument("--precision", "--dtype", dest="precision", default="auto", type=_precision,
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="the networks' precision, the rest stays float32 (default: auto = bfloat16 on CUDA and on a "
                   "CPU with native bf16 (AMX-BF16, AVX512-BF16), float32 on other CPUs; FASTGUIDE_CPU_BF16=none "
                   "keeps float32)")  # fmt: skip


def _precision(value: str) -> str:
    """--precision as given; "auto" (the default) also reads FASTGUIDE_CPU_BF16, refused here if bad."""
    if value == "auto":
        try:
            bf16_kind()
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return value


def add_guidance_schedule_arguments(p: argparse.ArgumentParser) -> None:
    """--guidance_every, --guidance_interval and --dynamic_threshold (:class:`SamplerConfig`; read back by
    :func:`sampler_options`)."""
    p.add_argument("--guidance_every", type=int, default=None, metavar="K",
                   help="call the classifier at every K-th step only, reusing its last scale and gradient "
                   "between (default: 1 = every step)")  # fmt: skip
    p.add_argument("--guidance_interval", default=None, metavar="LO,HI",
                   help="guide only at original timesteps LO..HI (inclusive; default: all)")  # fmt: skip
    p.add_argument("--dynamic_threshold", type=float, default=None, metavar="Q",
                   help=f"{'/'.join(names(takes_threshold=True))}: threshold x0 at the Q quantile of |x0| (Imagen; "
                   "at most 1.5) instead of "
                   "clipping to [-1, 1] (default: clip)")  # fmt: skip


def sampler_options(args: argparse.Namespace) -> dict:
    """The :class:`SamplerConfig` fields that :func:`add_guidance_schedule_arguments` sets, as given."""
    options = {}
    if args.guidance_every is not None:
        options["guidance_every"] = args.guidance_every
    if args.guidance_interval is not None:
        parts = args.guidance_interval.split(",")
        try:
            options["guidance_interval"] = tuple(int(v) for v in parts)
        except ValueError:
            raise ValueError(f"--guidance_interval must be LO,HI (two original timesteps), got "
                             f"{args.guidance_interval!r}") from None  # fmt: skip
        if len(parts) != 2:
            raise ValueError(f"--guidance_interval must be LO,HI (two original timesteps), got {args.guidance_interval!r}")
    if args.dynamic_threshold is not None:
        options["dynamic_threshold"] = args.dynamic_threshold
    return options


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def refuse_torchrun(command: str) -> None:
    """ValueError under torchrun with more than one process: every rank would do the whole job and write the
    same files."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise ValueError(f"fastguide {command} runs as one process, but torchrun started {world}: each would do "
                         "the whole job and write the same files; use fastguide adm-sample, which shards")  # fmt: skip
