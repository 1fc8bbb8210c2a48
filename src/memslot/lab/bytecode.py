"""Byte-compiling the guests' Python on the host. Under TCG a guest compiling the standard
library, numpy and memslot at every boot spends most of its run doing it; bytecode does not
depend on the architecture, so the host compiles once with the guests' own interpreter
(Debian's python3.13 for the host's architecture, unpacked into the cache and started through
its own dynamic loader) into unchecked-hash .pyc files, which every guest then imports as is.
Without such an interpreter the guests compile for themselves: slower, same results."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

from .archive import Archive
from .resolve import fetch_userland
from .targets import USERLAND_SUITE
from .unpack import extract

HOST_ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "riscv64": "riscv64", "ppc64le": "ppc64el"}
Log = Callable[[str], None]


def host_python(cache: Path, log: Log | None = None) -> list[str] | None:
    """The command that starts the guests' Python version on this host, unpacking it into the
    cache first; None where the host's architecture has no such package or it does not run."""
    arch = HOST_ARCHES.get(platform.machine())
    if arch is None:
        return None
    root = cache / "host-python" / arch
    if not (root / ".complete").is_file():
        debs = fetch_userland(Archive(USERLAND_SUITE, arch, cache, log=log))
        tmp = root.with_name(root.name + ".partial")
        _rmtree(tmp)
        tmp.mkdir(parents=True)
        extract(debs, tmp)
        (tmp / ".complete").touch()
        _rmtree(root)
        tmp.rename(root)
    cmd = python_command(root)
    if cmd is None:
        return None
    try:
        ok = subprocess.run([*cmd, "-c", "pass"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return cmd if ok else None


def python_command(root: Path) -> list[str] | None:
    """``[loader, --library-path, dirs, python3.13]`` for an unpacked userland ``root``."""
    python = root / "usr" / "bin" / "python3.13"
    loaders = sorted(p for pattern in ("usr/lib*/ld-linux*.so.*", "usr/lib*/ld64.so.*",
                                       "lib*/ld-linux*.so.*", "lib*/ld64.so.*")
                     for p in root.glob(pattern))
    libdirs = sorted({str(p.parent) for p in root.glob("usr/lib/*/libc.so.6")}
                     | {str(p.parent) for p in root.glob("lib/*/libc.so.6")})
    if not python.is_file() or not loaders or not libdirs:
        return None
    return [str(loaders[0]), "--library-path", ":".join(libdirs), str(python)]


def compile_tree(python: list[str], paths: list[Path]) -> None:
    """Write unchecked-hash .pyc files next to the sources under ``paths`` (a source that does
    not compile is left to the guest)."""
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        subprocess.run(
            [*python, "-m", "compileall", "-q", "-j", "1", "--invalidation-mode", "unchecked-hash",
             *existing], capture_output=True, timeout=900,
            env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
