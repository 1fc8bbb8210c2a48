"""One run on a target: the cached image (built first if needed), this run's overlay, a boot
under QEMU, and one retry when the guest hangs (reported as a hang, never as a result)."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import image as image_mod
from .bytecode import host_python
from .errors import Cancelled, GuestHang, ImageError
from .guest import RESULT
from .overlay import build_overlay
from .qemu import Console, Deadlines, boot, find_qemu, qemu_command
from .targets import Target, cache_dir

Log = Callable[[str], None]
DEFAULT_TIMEOUT = 900.0  # seconds for the command on amd64; scaled by the machine's slowness
#: Building images and the host bytecode writes the shared cache: one run at a time does it
#: (parallel matrix runs boot at once, but prepare in turn).
_PREPARE = threading.Lock()


@dataclass
class RunResult:
    target: str
    status: int
    seconds: float  # the successful attempt, boot included
    boot_seconds: float  # QEMU start to the command's start
    attempts: int
    hangs: list[str] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    kernel_trouble: list[str] = field(default_factory=list)


def run_job(target: Target, job: dict[str, Any], *, on_output: Callable[[str], None],
            timeout: float | None = None, retries: int = 1, log: Log | None = None,
            cache: Path | None = None, extra_files: dict[str, bytes] | None = None,
            cmdline_extra: tuple[str, ...] = (), qemu: str | None = None,
            cancel: threading.Event | None = None) -> RunResult:
    """Boot ``target`` and run ``job`` (see :mod:`.guest`) inside it. Setting ``cancel`` ends
    the guest and raises :class:`Cancelled` (parallel matrix runs on Ctrl-C)."""
    say = log or (lambda _m: None)
    if not target.bootable:
        raise ImageError(f"{target.name} cannot be booted: {target.machine.impossible}")
    binary = qemu or find_qemu(target)
    with _PREPARE:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"{target.name}: cancelled before it booted")
        img = image_mod.built(target, cache) or image_mod.build(target, cache, say)
        overlay = build_overlay(job, extra_files,
                                python=host_python(cache or cache_dir(), say))
    run_limit = (timeout or DEFAULT_TIMEOUT * target.machine.slowness)
    deadlines = Deadlines(boot=target.machine.boot_timeout, run=run_limit)
    hangs: list[str] = []
    with tempfile.TemporaryDirectory(prefix="memslot-lab-run-") as tmp:
        initrd = Path(tmp) / "initrd"
        with open(initrd, "wb") as out:
            for part in (image_mod.userland_path(target.machine.debian_arch, cache),
                         img.modules):
                out.write(part.read_bytes())
            out.write(overlay)
        cmd = qemu_command(target, img.kernel, initrd, cmdline_extra=cmdline_extra,
                           qemu=binary)
        for attempt in range(1, retries + 2):
            results: list[dict[str, Any]] = []

            def take(line: str, results: list[dict[str, Any]] = results) -> None:
                if line.startswith(RESULT):
                    try:
                        results.append(json.loads(line[len(RESULT):]))
                    except ValueError:
                        on_output(line)
                    return
                on_output(line)

            start = time.monotonic()
            console = Console()
            try:
                status, console = boot(cmd, deadlines, take, console, cancel)
            except GuestHang as exc:
                hangs.append(f"attempt {attempt}: {exc}")
                say(f"lab: {target.name}: HANG: {exc}")
                if attempt > retries:
                    raise GuestHang(f"{target.name}: {exc} (hung {len(hangs)} times)",
                                    exc.log_tail) from None
                continue
            if console.failed_modules:
                say(f"lab: {target.name}: could not load {', '.join(console.failed_modules)}")
            elapsed = time.monotonic() - start
            begin = console.begin_at if console.begin_at is not None else start + elapsed
            return RunResult(target.name, status, elapsed, begin - start, attempt, hangs,
                             results, console.trouble)
    raise AssertionError("unreachable")  # pragma: no cover


def environment_note() -> str:
    """One line on the host's load, for reports (the lab shares its CPUs)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    return f"host load {load:.1f} on {os.cpu_count()} CPUs"
