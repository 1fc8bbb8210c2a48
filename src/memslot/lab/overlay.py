"""The per-run archive laid over a cached image: the init script, the memslot package (pure
Python, copied from the running installation so the guest runs the code under test; compiled
extension modules are left out) and the job.

The init script mounts the kernel file systems, loads the KVM modules, then runs the job
between two markers on the console and powers off; the host reads the markers
(:mod:`.qemu`)."""

from __future__ import annotations

import gzip
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from .bytecode import compile_tree
from .cpio import CpioWriter

BOOTED = "@@MEMSLOT-LAB-BOOTED@@"
BEGIN = "@@MEMSLOT-LAB-BEGIN@@"
EXIT = "@@MEMSLOT-LAB-EXIT"  # followed by " STATUS@@"
MODULE_FAILED = "@@MEMSLOT-LAB-MODULE-FAILED"

INIT = f"""#!/usr/bin/busybox sh
bb=/usr/bin/busybox
export PATH=/usr/bin:/usr/sbin HOME=/root PYTHONUNBUFFERED=1 PYTHONPATH=/lab/src LANG=C.UTF-8
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
echo "{BOOTED}"
for m in $($bb cat /lab/modules.order); do
    $bb insmod /lab/modules/$m || echo "{MODULE_FAILED} $m@@"
done
cd /lab
echo "{BEGIN}"
set -o pipefail
/usr/bin/python3 /lab/src/memslot/lab/guest.py 2>&1 | $bb cat
echo "{EXIT} $?@@"
# An emulated UART drains a long last line slowly: wait until the console has sent everything
# (tcdrain), else the reboot cuts it (the host stops the guest once it reads the EXIT marker).
/usr/bin/python3 -c "import termios; termios.tcdrain(1)" 2>/dev/null
$bb sync
$bb sleep 10
$bb reboot -f
$bb sleep 5
$bb poweroff -f
"""


def package_files(package_dir: Path, python: list[str] | None = None
                  ) -> list[tuple[str, bytes]]:
    """(path under memslot/, content) of the package's Python sources and data files, with
    their bytecode for the guests' Python when ``python`` (see :mod:`.bytecode`) is given."""
    sources = []
    for path in sorted(package_dir.rglob("*")):
        rel = path.relative_to(package_dir)
        if "__pycache__" in rel.parts or not path.is_file():
            continue
        if path.suffix in (".py", ".typed", ".json") or rel.parts[0] == "data":
            sources.append((rel.as_posix(), path.read_bytes()))
    if not python:
        return sources
    with tempfile.TemporaryDirectory(prefix="memslot-lab-src-") as tmp:
        root = Path(tmp) / "memslot"
        for name, data in sources:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        compile_tree(python, [root])
        return [(p.relative_to(root).as_posix(), p.read_bytes())
                for p in sorted(root.rglob("*")) if p.is_file()]


def memslot_dir() -> Path:
    import memslot

    return Path(memslot.__file__).resolve().parent


def build_overlay(job: dict[str, Any], extra_files: dict[str, bytes] | None = None,
                  package_dir: Path | None = None, python: list[str] | None = None) -> bytes:
    """The gzip'd cpio of one run: /init, /lab/job.json, /lab/src/memslot/..., extra files
    (path in the guest -> content)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6) as raw:
        w = CpioWriter(raw)  # type: ignore[arg-type]
        w.file("init", INIT.encode(), 0o755)
        w.symlink("usr/bin/sh", "busybox")
        w.directory("lab")
        w.file("lab/job.json", json.dumps(job).encode())
        for rel, data in package_files(package_dir or memslot_dir(), python):
            name = f"lab/src/memslot/{rel}"
            w.parents(name)
            w.file(name, data)
        for name, data in (extra_files or {}).items():
            w.parents(name.lstrip("/"))
            w.file(name.lstrip("/"), data, 0o755)
        w.finish()
    return buf.getvalue()
