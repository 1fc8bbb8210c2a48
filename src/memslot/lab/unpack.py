"""Unpacking Debian packages without installing them (``dpkg-deb -x``: no maintainer scripts,
no emulation, any architecture)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from .archive import Package
from .errors import ImageError, ToolMissing


def need(tool: str) -> None:
    """:class:`ToolMissing` unless ``tool`` is on PATH."""
    if shutil.which(tool) is None:
        raise ToolMissing(f"{tool} is not installed (run 'make lab-deps')")


def extract(debs: Iterable[tuple[Package, Path]], into: Path) -> None:
    """Unpack each .deb's files into ``into``."""
    need("dpkg-deb")
    for pkg, path in debs:
        proc = subprocess.run(["dpkg-deb", "-x", str(path), str(into)], capture_output=True,
                              text=True)
        if proc.returncode:
            raise ImageError(f"dpkg-deb could not unpack {pkg.name} {pkg.version}: "
                             f"{proc.stderr.strip()[:200]}")
