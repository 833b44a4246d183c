"""How ``fastguide sample`` replaces an earlier run's files as a whole: its new files are made in a hidden
folder inside ``--out`` and committed under a journal, so the folder holds one complete run, never a mix."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

from ..files import atomic_write, folder_lock, make_temp_dir, try_lock

STAGING = ".fastguide-staging-"  # a `fastguide sample` run's folder of new files, inside --out

JOURNAL, DONE, OLD = ".journal.json", ".done", ".old"  # inside it: what a commit moves; it finished; the earlier files


class Staging:
    """A ``fastguide sample`` run's files are made in a hidden folder inside ``out`` and replace the earlier
    run's as a whole: ``out`` holds the complete earlier run or the complete new one, never a mix.

    The commit (under ``out``'s lock) writes a journal, moves the earlier run's files (those its run.json
    lists, and any the new run overwrites) aside into the staging folder, moves the new files in, and marks
    the journal done. An error on the way moves everything back and raises; a run killed on the way is put
    back by the next ``Staging`` of that folder, which also removes the folders of killed runs that never got
    to commit (a live run's is locked, so it is left alone). Other files in ``out`` are left alone.
    ``removed`` names the earlier run's files that the new run did not replace.
    """

    def __init__(self, out: Path):
        self.out = out
        self.removed: list[str] = []
        self._made = [p for p in (out, *out.parents) if not p.exists()][::-1]  # folders to remove on failure
        out.mkdir(parents=True, exist_ok=True)
        with folder_lock(out, "fastguide sample", wait=True):
            recover_staging(out)
            self.tmp = make_temp_dir(out, STAGING)
            self._fd = try_lock(self.tmp)  # marks it as a live run's

    def path(self, name: str) -> Path:
        return self.tmp / name

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, kind, value, tb) -> None:
        committed = False
        try:
            if kind is None:
                with folder_lock(self.out, "fastguide sample", wait=True):
                    self._commit()
                committed = True
        finally:
            os.close(self._fd)
            if (self.tmp / JOURNAL).exists():  # the earlier run could not be put back: the next run does it
                warnings.warn(f"{str(self.out)!r} could not be put back as it was; the next fastguide sample into it "
                              "does so")  # fmt: skip
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
            if not committed:
                for folder in reversed(self._made):
                    with contextlib.suppress(OSError):
                        folder.rmdir()

    def _commit(self) -> None:
        new = sorted(f.name for f in self.tmp.iterdir() if not f.name.startswith("."))
        displaced = sorted(n for n in earlier_run_files(self.out) | set(new) if os.path.lexists(self.out / n))
        (self.tmp / OLD).mkdir()
        atomic_write(self.tmp / JOURNAL, lambda t: t.write_text(json.dumps({"new": new, "displaced": displaced})))
        try:
            for name in displaced:
                os.replace(self.out / name, self.tmp / OLD / name)
            for name in new:
                os.replace(self.tmp / name, self.out / name)
            os.replace(self.tmp / JOURNAL, self.tmp / DONE)  # the commit point
        except BaseException:
            _undo(self.out, self.tmp)
            raise
        self.removed = sorted(set(displaced) - set(new))


def _undo(out: Path, staging: Path) -> None:
    """Put ``out`` back as it was before the commit its journal describes, from what is where: a new file
    no longer in the staging folder is in ``out``, an earlier file in ``.old`` was moved there. Safe to repeat
    (a run killed while undoing is undone again); the journal goes last."""
    journal = json.loads((staging / JOURNAL).read_text())
    for name in journal["new"]:
        if not os.path.lexists(staging / name) and os.path.lexists(out / name):
            os.replace(out / name, staging / name)
    for name in journal["displaced"]:
        if os.path.lexists(staging / OLD / name):
            os.replace(staging / OLD / name, out / name)
    os.unlink(staging / JOURNAL)


def recover_staging(out: Path) -> list[str]:
    """The staging folders in ``out`` of ``fastguide sample`` runs that were killed: a commit cut short is
    undone (``out`` gets the earlier run back), then the folder goes. Call it holding ``out``'s lock.
    Returns the folders' names."""
    found = []
    for staging in sorted(out.glob(STAGING + "*")):
        if not staging.is_dir() or staging.is_symlink() or (fd := try_lock(staging)) is None:
            continue  # a live run's
        try:
            if (staging / JOURNAL).is_file() and not (staging / DONE).exists():
                try:
                    _undo(out, staging)
                except (OSError, ValueError, KeyError, TypeError) as err:
                    warnings.warn(f"could not put back the earlier run from {str(staging)!r}: {err}")
                    continue
            shutil.rmtree(staging, ignore_errors=True)
            found.append(staging.name)
        finally:
            os.close(fd)
    return found


# the files `fastguide sample` writes (run_sample's `names`)
SAMPLE_FILES = re.compile(r"grid\.png|trace\.png|grad_maps\.png|run\.json|samples_\d+x\d+x\d+x\d+\.npz")


def earlier_run_files(out: Path) -> set[str]:
    """The files of an earlier ``fastguide sample`` run in ``out``: those its run.json lists, if that run.json
    is one ``sample`` wrote, and only names ``sample`` writes (nothing else, nothing outside ``out``)."""
    try:
        run = json.loads((out / "run.json").read_text())
        files = run["files"].values() if {"what", "args", "files"} <= set(run) else ()
    except (OSError, ValueError, TypeError, AttributeError):
        return set()
    return {n for n in files if isinstance(n, str) and SAMPLE_FILES.fullmatch(n) and (out / n).is_file()}
