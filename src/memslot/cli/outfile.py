"""Writing an output file whole: a temporary file beside it, renamed over it once complete,
with the mode a plain ``open()`` would give (the umask's for a new file, the old file's for
a replaced one), never mkstemp's private 0600."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable

from .common import die


def _mode(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomic(path: str, fill: Callable[[str], None], suffix: str = "") -> None:
    """Call ``fill(tmp)`` to write the content to a temporary path, then move it to
    ``path``; a one-line error (and no file left behind) when that fails."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".memslot-", suffix=suffix, dir=directory)
    except OSError as exc:
        die(f"{path}: cannot write: {exc.strerror or exc}")
    try:
        os.fchmod(fd, _mode(path))
        os.close(fd)
        fill(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        die(f"{path}: cannot write: {exc.strerror or exc}")
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
