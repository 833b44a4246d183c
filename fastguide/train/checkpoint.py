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
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.glob("step_*") if p.is_dir())
    latest = latest_checkpoint(root)
    for old in complete[: max(0, len(complete) - keep)]:
        if old != latest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # leftovers of a crashed write
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files are incomplete or corrupt (truncated, bad CRC): not a refused payload."""


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
            complete = sorted(p for p in folder.glob("step_*") if (p / "state.pt").is_file())
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
    others = sorted((p for p in first.parent.glob("step_*") if (p / "state.pt").is_file() and p != first), reverse=True)
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
    """torch.save's zip archive complete, every member's CRC right (else DamagedCheckpoint)."""
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
        except Exception as err:  # safetensors raises its own SafetensorError for a short or garbled file
            raise DamagedCheckpoint(f"{str(p)!r} is damaged ({err})") from None
    if "model" not in weights:
        raise DamagedCheckpoint(f"{str(path)!r} has no model.safetensors")
    _check_state_archive(path / "state.pt")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"refusing to load {str(path / 'state.pt')!r}: not a weights-only checkpoint ({err})") from err
    return weights, state
