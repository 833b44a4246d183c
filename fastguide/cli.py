"""The ``fastguide`` command line. It only maps arguments onto the frozen config dataclasses.

Every field of a config becomes ``--field_name`` (ADM's flag names for the architecture), with the
field's comment as its help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import signal
import sys
import threading
import warnings
from collections.abc import Sequence

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


def _train_command(sub, name: str, config_cls, help_text: str):
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


class _Parser(argparse.ArgumentParser):
    """Bad arguments end with one line, ``PROG: error: ...``, and exit status 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .adm_sample import add_adm_sample_command
    from .commands import add_evaluate_command, add_reproduce_command, add_sample_command
    from .train.tasks import ClassifierTrainConfig, DiffusionTrainConfig

    parser = _Parser(prog="fastguide", description="Classifier-guided diffusion with EDS and ECT.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_sample_command(sub)
    add_evaluate_command(sub)
    add_reproduce_command(sub)
    add_adm_sample_command(sub)
    _train_command(
        sub, "train-classifier", ClassifierTrainConfig,
        "Train a noise-aware classifier (ADM's recipe; ECT with --eta > 0). Runs under torchrun for DDP.",
    )  # fmt: skip
    _train_command(
        sub, "train-diffusion", DiffusionTrainConfig,
        "Train a diffusion UNet, eps-, x0- or v-prediction (--predict_xstart, --predict_v), on L_simple, or L_hybrid with --learn_sigma. Runs under torchrun.",
    )  # fmt: skip
    return parser


def _train(args: argparse.Namespace) -> None:
    config = args._build(args)
    if args.command == "train-classifier":
        from .train.tasks import train_classifier as run
    else:
        from .train.tasks import train_diffusion as run
    run(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastguide`` console script and ``python -m fastguide``.

    Bad input ends the command with one line ``fastguide CMD: error: ...`` on stderr and exit status 2; an
    OS error at run time (a full disk, an I/O error) or MemoryError with one line and status 1; Ctrl-C and
    SIGTERM with one line ``fastguide CMD: interrupted: ...`` and status 130 or 143.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"fastguide {args.command}: warning: {message}\n"
    previous_term = _raise_on_sigterm()
    try:
        args._run(args)
    except (ValueError, FileNotFoundError, PermissionError, FloatingPointError, ModuleNotFoundError) as err:
        return _say(args.command, "error", err, 2)
    except OSError as err:  # the machine's, not the input's: a full disk, an I/O error, ...
        return _say(args.command, "error", err, 1)
    except MemoryError:
        return _say(args.command, "error", "out of memory (MemoryError); try a smaller --batch_size or --count", 1)
    except KeyboardInterrupt:  # Ctrl-C: the outputs written so far are complete files; a rerun resumes or redoes
        return _say(args.command, "interrupted", "stopped by Ctrl-C (SIGINT)", 130)
    except _Terminated:
        return _say(args.command, "interrupted", "stopped by SIGTERM", 143)
    finally:
        warnings.formatwarning = previous_format
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    return 0


class _Terminated(BaseException):
    """SIGTERM, raised where the program is, so that the same cleanup runs as for Ctrl-C."""


def _raise_on_sigterm():
    """SIGTERM raises :class:`_Terminated` (main thread only); returns the handler it replaced, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Terminated()

    return signal.signal(signal.SIGTERM, handler)


def _say(command: str, kind: str, err, status: int) -> int:
    """``fastguide CMD: KIND: message`` on one line of stderr; returns ``status``."""
    if isinstance(err, OSError) and err.strerror and not isinstance(err, (FileNotFoundError, PermissionError)):
        where = " ".join(str(f) for f in (err.filename, err.filename2) if f)
        message = f"{err.strerror} ({where})" if where else err.strerror
    else:
        message = " ".join(str(err).split()) or type(err).__name__
    print(f"fastguide {command}: {kind}: {message}", file=sys.stderr)
    return status
