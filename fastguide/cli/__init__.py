"""The ``fastguide`` command line, one module per subcommand: :mod:`.sample`, :mod:`.evaluate`,
:mod:`.reproduce`, :mod:`.adm_sample` and :mod:`.train` (train-classifier, train-diffusion); :mod:`.args`
holds the flags they share and :mod:`.staging` how ``sample`` replaces its files.

The commands only map arguments onto the library's configs; the library checks the values where they enter
and its errors become one line ``fastguide CMD: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from collections.abc import Sequence


class _Parser(argparse.ArgumentParser):
    """Bad arguments end with one line, ``PROG: error: ...``, and exit status 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from ..train.tasks import ClassifierTrainConfig, DiffusionTrainConfig
    from .adm_sample import add_adm_sample_command
    from .evaluate import add_evaluate_command
    from .reproduce import add_reproduce_command
    from .sample import add_sample_command
    from .train import add_train_command

    parser = _Parser(prog="fastguide", description="Classifier-guided diffusion with EDS and ECT.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_sample_command(sub)
    add_evaluate_command(sub)
    add_reproduce_command(sub)
    add_adm_sample_command(sub)
    add_train_command(
        sub, "train-classifier", ClassifierTrainConfig,
        "Train a noise-aware classifier (ADM's recipe; ECT with --eta > 0). Runs under torchrun for DDP.",
    )  # fmt: skip
    add_train_command(
        sub, "train-diffusion", DiffusionTrainConfig,
        "Train a diffusion UNet, eps-, x0- or v-prediction (--predict_xstart, --predict_v), on L_simple, or L_hybrid with --learn_sigma. Runs under torchrun.",
    )  # fmt: skip
    return parser


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
