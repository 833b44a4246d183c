"""Fault injection for the file operations of a command: the k-th write, rename or removal fails (an
OSError such as EIO or ENOSPC) or kills the process on the spot (``os._exit``, as kill -9 would: no
``finally``, no ``except``), so that a test can walk k over every file operation a command makes.

    with FileFaults() as count:          # count the operations of a clean run
        run()
    for k in range(count.calls):
        with FileFaults(fail_at=k):      # the k-th one raises OSError(EIO)
            ...
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class FileFaults:
    """Patches ``os.replace``, ``os.rename``, ``os.unlink``, ``os.mkdir``, ``os.rmdir``, ``shutil.rmtree``,
    ``os.open`` and ``open`` (``io.open``) for writing; counts their calls (``calls``, ``names``) and makes call number
    ``fail_at`` (0-based) raise ``OSError(error)``, or end the process with ``os._exit(kill_code)`` when
    ``kill_code`` is given."""

    def __init__(self, fail_at: int | None = None, error: int = errno.EIO, kill_code: int | None = None):
        self.fail_at, self.error, self.kill_code = fail_at, error, kill_code
        self.calls = 0
        self.names: list[str] = []
        self._saved: list[tuple[object, str, object]] = []

    def _hit(self, what: str, path) -> None:
        k = self.calls
        self.calls += 1
        self.names.append(f"{what} {os.fspath(path) if isinstance(path, (str, os.PathLike)) else path}")
        if k == self.fail_at:
            if self.kill_code is not None:
                os._exit(self.kill_code)
            raise OSError(self.error, os.strerror(self.error), os.fspath(path) if isinstance(path, (str, os.PathLike)) else None)

    def _wrap(self, owner, name: str, when=lambda *a, **k: True) -> None:
        real = getattr(owner, name)

        def patched(*args, **kwargs):
            if args and when(*args, **kwargs):
                self._hit(name, args[0])
            return real(*args, **kwargs)

        self._saved.append((owner, name, real))
        setattr(owner, name, patched)

    def __enter__(self) -> "FileFaults":
        for name in ("replace", "rename", "unlink", "mkdir", "rmdir"):
            self._wrap(os, name)
        self._wrap(shutil, "rmtree")
        self._wrap(os, "open", lambda path, flags, *a, **k: bool(flags & _WRITE_FLAGS))
        writing = lambda file, mode="r", *a, **k: isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
        self._wrap(builtins, "open", writing)
        self._wrap(io, "open", writing)  # pathlib's and zipfile's
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, real in reversed(self._saved):
            setattr(owner, name, real)
        self._saved.clear()


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too), by relative path, with its bytes."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.isdir(path) and not os.path.islink(path):
                found[rel + "/"] = b""
            else:
                with builtins.open(path, "rb") as f:
                    found[rel] = f.read()
    return found
