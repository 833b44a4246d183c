"""Writing files so that none is ever half-written, with the permissions the user's umask gives."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _unique_sibling(parent: Path, prefix: str, suffix: str, create: Callable[[Path], None]) -> Path:
    """``create(parent / (prefix + random + suffix))`` for a name that does not exist yet; returns it."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            create(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no unused temporary name in {str(parent)!r}")


def _create_file(path: Path) -> None:
    # 0o666 & ~umask, as open() gives; tempfile.mkstemp would make it 0o600 whatever the umask
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new empty folder under ``parent`` with mode 0o777 & ~umask (``tempfile.mkdtemp`` gives 0o700,
    which a folder renamed into place, such as a checkpoint, would keep)."""
    return _unique_sibling(Path(parent), prefix, "", lambda p: os.mkdir(p, 0o777))


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then rename it to ``path``.

    The file gets the mode a plain ``open(path, "w")`` gives a new file (0o666 & ~umask; an existing
    file's mode is not kept); on any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _unique_sibling(path.parent, f".{path.stem}.", path.suffix, _create_file)
    mode = stat.S_IMODE(tmp.stat().st_mode)  # what the umask made of 0o666
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer may have replaced the file with its own (safetensors: 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_csv(path: str | os.PathLike, rows: list[dict], columns: tuple[str, ...]) -> None:
    """``rows`` as a CSV with the header ``columns``, written atomically (:func:`atomic_write`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: tmp.write_text(buf.getvalue()))


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path, after checking that it is a file.

    Raises:
        ValueError: it is a folder ("<what> 'x' is a folder, not a file").
        FileNotFoundError: nothing is there.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    return path


def check_output_folder(out: str | os.PathLike) -> Path:
    """``out`` as a Path, after checking that files can be created there (nothing is created).

    Raises:
        PermissionError: the folder (or the nearest existing parent) is not writable, or a parent is a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PermissionError(f"output folder {str(out)!r} exists and is not a folder")
    probe = nearest_existing(out)
    if not probe.is_dir():
        raise PermissionError(f"output folder {str(out)!r} cannot be created: {str(probe)!r} is a file")
    # access(2), not a probe file: a probe whose removal fails would be left behind
    if not os.access(probe, os.W_OK | os.X_OK):
        why = "read-only file system" if os.statvfs(probe).f_flag & os.ST_RDONLY else "permission denied"
        raise PermissionError(f"output folder {str(out)!r} is not writable ({why})")
    return out


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` itself if it exists, else its closest existing ancestor."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    return path


# ------------------------------------------------------------------------------------------- one writer


def try_lock(folder: str | os.PathLike, wait: bool = False) -> int | None:
    """An open descriptor of ``folder`` holding an exclusive ``flock`` on it, or None when another open
    descriptor (another process, or this one) holds it and ``wait`` is false (with ``wait``, block until the
    holder lets go). The kernel drops the lock when the descriptor is closed or the process ends, however it
    ends: a killed run leaves no stale lock and no lock file."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
    """Hold ``folder``'s lock (:func:`try_lock`) for the with-block: one writer per folder.

    Args:
        what: the command, for the message ("fastguide adm-sample").
        wait: wait for the holder to finish (for short critical sections) instead of refusing.
    Raises:
        ValueError: another process holds it and ``wait`` is false.
    """
    fd = try_lock(folder, wait)
    if fd is None:
        raise ValueError(f"{str(folder)!r} is in use: another {what} is writing there (one writer per folder); "
                         "wait for it to finish or use another output folder")  # fmt: skip
    try:
        yield
    finally:
        os.close(fd)


def size_text(nbytes: float) -> str:
    """``nbytes`` for a message: "512 B", "3.2 MB", "1.5 GB"."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000


def check_disk_space(out: str | os.PathLike, need: int, what: str, why: str) -> None:
    """ValueError, before any work, when the file system that will hold ``out`` has less than ``need`` bytes
    free: "{what} needs about {need} on disk at {out} ({why}), and {free} are free"."""
    free = shutil.disk_usage(nearest_existing(out)).free
    if need > free:
        raise ValueError(f"{what} needs about {size_text(need)} on disk at {str(out)!r} ({why}), "
                         f"and {size_text(free)} are free")  # fmt: skip


def temporary_name(name: str) -> re.Pattern:
    """The names :func:`atomic_write` gives its temporary files for a file called ``name``."""
    stem, dot, suffix = name.rpartition(".") if "." in name else (name, "", "")
    return re.compile(rf"\.{re.escape(stem)}\.[0-9a-f]{{12}}{re.escape(dot + suffix)}")


def remove_temporaries(folder: str | os.PathLike, names: re.Pattern) -> list[str]:
    """Remove the files in ``folder`` whose names fully match ``names`` (a killed run's temporaries);
    call it holding the folder's lock. Returns the names removed."""
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(folder):
            if names.fullmatch(entry.name) and not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return sorted(removed)
