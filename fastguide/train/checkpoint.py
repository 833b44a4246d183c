"""Training checkpoints: written atomically, read without unpickling code.

Layout under ``out_dir/checkpoints/``::

    step_000500/         one complete checkpoint
        model.safetensors    weights
        ema.safetensors      EMA weights (diffusion training)
        state.pt             optimizer, grad scaler, step, epoch, data position, RNG states (weights-only pickle)
        config.json          the run's configuration
    latest               name of the newest complete checkpoint

A checkpoint is written into a temporary folder, flushed, and renamed into place; only then is
``latest`` replaced (again through a temporary file and a rename). A crash at any point leaves the
previous checkpoint and ``latest`` untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..adm.networks.checkpoint import weights_only_refusal
from ..files import atomic_write, make_temp_dir

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def write_checkpoint(
    root: str | os.PathLike,
    step: int,
    weights: dict[str, dict[str, torch.Tensor]],
    state: dict,
    config: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and point ``latest`` at it.

    Args:
        root: the checkpoints folder (created if missing).
        weights: file stem -> state_dict, each saved as ``<stem>.safetensors`` (e.g. ``{"model": ...}``).
        state: everything else needed to resume; tensors, numbers, strings, lists and dicts only.
        config: JSON-serialisable run configuration.
        keep: how many complete checkpoints to keep (older ones are removed after ``latest`` moves).
    Returns:
        the checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp = make_temp_dir(root, f".tmp-{name}-")
    try:
        for stem, sd in weights.items():
            tensors = _contiguous(sd)
            atomic_write(tmp / f"{stem}.safetensors", lambda path: save_file(tensors, str(path)))
        torch.save(state, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True, default=str))
        for f in tmp.iterdir():
            _fsync_file(f)
        final = root / name
        if final.exists():  # a checkpoint of the same step from an earlier attempt: move it aside first
            old = make_temp_dir(root, f".tmp-old-{name}-")
            os.rename(final, old / name)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        pointer = root / f".tmp-{LATEST}-{os.getpid()}"
        pointer.write_text(name + "\n")
        _fsync_file(pointer)
        os.replace(pointer, root / LATEST)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep)
    return final


def _steps(folder: Path) -> list[Path]:
    """The ``step_N`` folders under ``folder``, by N (not by name: a name with more digits sorts wrongly)."""
    found = [p for p in folder.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len("step_") :]))


def _prune(root: Path, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints up to ``latest``; remove the rest, and the ones newer than
    ``latest`` (left from before a resume that went back past them, e.g. because they were damaged)."""
    latest = latest_checkpoint(root)
    steps = _steps(root)
    if latest in steps:
        steps, newer = steps[: steps.index(latest) + 1], steps[steps.index(latest) + 1 :]
    else:
        newer = []
    for old in newer + steps[: max(0, len(steps) - keep)]:
        if old != latest:
            shutil.rmtree(old, ignore_errors=True)
    remove_stale(root)


def remove_stale(root: str | os.PathLike) -> None:
    """The leftovers of a crashed :func:`write_checkpoint` under ``root`` (``.tmp-*`` folders and pointer
    files); call it as the folder's only writer."""
    for stale in Path(root).glob(".tmp-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files are cut short or unreadable (a weights file without a complete header and
    data, a state archive with a missing directory or a bad CRC), as opposed to a refused payload. Flipped
    bits inside a weights file's tensor data go unnoticed: safetensors has no checksum."""


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The folder ``latest`` names under ``root`` (a checkpoints folder or a run's out_dir), or None."""
    root = Path(root)
    for folder in (root, root / "checkpoints"):
        pointer = folder / LATEST
        if pointer.is_file():
            path = folder / pointer.read_text().strip()
            if (path / "state.pt").is_file():
                return path
            # a crash while the same step was re-written: fall back to the newest complete checkpoint
            complete = [p for p in _steps(folder) if (p / "state.pt").is_file()]
            if not complete:
                raise ValueError(f"checkpoint pointer {str(pointer)!r} names {str(path)!r}, which is incomplete")
            warnings.warn(f"{str(path)!r} named by {str(pointer)!r} is incomplete; using {str(complete[-1])!r}")
            return complete[-1]
    return None


def checkpoint_candidates(root: str | os.PathLike) -> list[Path]:
    """The checkpoints under ``root`` to resume from, in order: the one ``latest`` names, then the other
    folders that have a state file, newest first."""
    first = latest_checkpoint(root)
    if first is None:
        return []
    others = [p for p in reversed(_steps(first.parent)) if (p / "state.pt").is_file() and p != first]
    return [first, *others]


def load_latest_checkpoint(root: str | os.PathLike) -> tuple[Path, dict[str, dict[str, torch.Tensor]], dict] | None:
    """(folder, weights, state) of the newest checkpoint under ``root`` that reads completely, or None
    when there is none. A damaged checkpoint (a truncated or corrupt file) is passed over with a warning
    naming it; a refused one (code in the state file) stops with the error.

    Raises:
        ValueError: every checkpoint there is damaged (each is named with its reason), or one is refused.
    """
    damaged = []
    for path in checkpoint_candidates(root):
        try:
            weights, state = read_checkpoint(path)
        except DamagedCheckpoint as err:
            damaged.append(str(err))
            continue
        if damaged:
            warnings.warn(f"{'; '.join(damaged)}; resuming from {str(path)!r} instead")
        return path, weights, state
    if damaged:
        raise ValueError(f"no readable checkpoint under {str(root)!r}: {'; '.join(damaged)}")
    return None


def _check_state_archive(path: Path) -> None:
    """Raise DamagedCheckpoint if torch.save's zip archive is empty, cut short or fails a CRC. A file that
    is not a zip archive at all (torch's legacy pickle format, or anything else) is left to the
    weights-only loader, which refuses what it cannot read safely."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise DamagedCheckpoint(f"{str(path)!r} is damaged (empty)")
    if head != b"PK\x03\x04":
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DamagedCheckpoint(f"{str(path)!r} is damaged ({err})") from None
    if bad is not None:
        raise DamagedCheckpoint(f"{str(path)!r} is damaged (bad CRC in {bad})")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read a checkpoint folder: ({stem: state_dict}, state). The state is unpickled weights-only.

    Raises:
        DamagedCheckpoint: a weights file or the state file is truncated or corrupt, or the model's
            weights are missing.
        ValueError: not a checkpoint folder, or the state file holds anything but tensors and plain
            containers (e.g. code).
    """
    path = Path(path)
    if not (path / "state.pt").is_file():
        raise ValueError(f"{str(path)!r} is not a checkpoint folder (no state.pt)")
    weights = {}
    for p in sorted(path.glob("*.safetensors")):
        try:
            weights[p.stem] = load_file(str(p))
        except SafetensorError as err:  # a header or data cut short or garbled
            raise DamagedCheckpoint(f"{str(p)!r} is damaged ({err})") from None
    if "model" not in weights:
        raise DamagedCheckpoint(f"{str(path)!r} has no model.safetensors")
    _check_state_archive(path / "state.pt")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(weights_only_refusal(path / "state.pt", err)) from None
    return weights, state
