"""Booting a target under QEMU: the command line, reading the serial console with deadlines,
and making sure nothing is left running.

QEMU runs niced in its own process group; whatever happens (a timeout, an exception, ^C) the
group is killed in a ``finally``. The console is read line by line: everything before the
init script's BEGIN marker is boot log; what follows until the EXIT marker is the guest
command's output, passed on as it arrives. A guest that misses a deadline, dies without the
EXIT marker, or whose kernel reports a lockup or panic is a :class:`~.errors.GuestHang`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import Cancelled, GuestHang, ToolMissing
from .overlay import BEGIN, BOOTED, EXIT, MODULE_FAILED
from .targets import Target

MEMORY_MB = 1536
NICE = 10
#: Kernel console lines that mean the guest kernel is in trouble.
TROUBLE = re.compile(r"Kernel panic|soft lockup|hard LOCKUP|self-detected stall|"
                     r"detected stalls on CPUs|blocked for more than|BUG: |Oops[: ]|"
                     r"Unable to handle kernel|general protection fault")
_EXIT_RE = re.compile(re.escape(EXIT) + r" (\d+)@@")


def kernel_cmdline(target: Target, extra: tuple[str, ...] = ()) -> str:
    return " ".join((f"console={target.machine.console}", "panic=-1", "quiet", "loglevel=3",
                     "nokaslr", "rdinit=/init", *target.machine.extra_cmdline, *extra))


def qemu_command(target: Target, kernel: Path, initrd: Path, memory_mb: int = MEMORY_MB,
                 cmdline_extra: tuple[str, ...] = (), qemu: str | None = None,
                 nice: int = NICE) -> list[str]:
    """The full command line (``nice`` first) booting ``kernel`` with ``initrd``."""
    binary = qemu or target.machine.qemu
    cmd = ["nice", "-n", str(nice)] if nice else []
    cmd += [binary, *target.machine.qemu_args,
            "-smp", "1", "-m", str(memory_mb),
            "-nic", "none", "-display", "none", "-no-reboot",
            "-serial", "stdio", "-monitor", "none",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", kernel_cmdline(target, cmdline_extra)]
    return cmd


def find_qemu(target: Target) -> str:
    path = shutil.which(target.machine.qemu)
    if path is None:
        raise ToolMissing(f"{target.machine.qemu} is not installed (run 'make lab-deps')")
    return path


@dataclass
class Console:
    """What the guest's console said so far: the parser behind :func:`boot`."""

    phase: str = "boot"  # boot -> running -> done
    status: int | None = None
    booted: bool = False
    trouble: list[str] = field(default_factory=list)
    failed_modules: list[str] = field(default_factory=list)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    begin_at: float | None = None  # time.monotonic() when the command started

    def feed(self, line: str) -> str | None:
        """Take one console line; returns it when it is the guest command's output."""
        line = line.rstrip("\r\n").replace("\r", "")
        self.tail.append(line)
        if TROUBLE.search(line):
            self.trouble.append(line.strip())
        if self.phase == "boot":
            if BOOTED in line:
                self.booted = True
            elif MODULE_FAILED in line:
                self.failed_modules.append(line.split(MODULE_FAILED, 1)[1].strip(" @"))
            elif BEGIN in line:
                self.phase = "running"
                self.begin_at = time.monotonic()
            return None
        if self.phase == "running":
            m = _EXIT_RE.search(line)
            if m:
                self.status = int(m.group(1))
                self.phase = "done"
                before = line[:m.start()]
                return before if before.strip() else None
            return line
        return None


@dataclass(frozen=True)
class Deadlines:
    boot: float  # seconds from start to the BEGIN marker
    run: float  # seconds from BEGIN to the EXIT marker
    shutdown: float = 2.0  # from EXIT to QEMU's own exit, then it is killed


def boot(cmd: list[str], deadlines: Deadlines, on_output: Callable[[str], None],
         console: Console | None = None,
         cancel: threading.Event | None = None) -> tuple[int, Console]:
    """Run QEMU; pass the guest command's output lines to ``on_output``; return its exit
    status. :class:`GuestHang` on a missed deadline, a kernel in trouble with no exit, or a
    guest that ends without the EXIT marker; :class:`Cancelled` within a second of
    ``cancel`` being set. QEMU is ended whichever way this returns."""
    con = console or Console()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent)
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        start = time.monotonic()
        deadline = start + deadlines.boot
        pending = b""
        eof = False
        while not eof:
            if cancel is not None and cancel.is_set():
                raise Cancelled("the run was cancelled")
            now = time.monotonic()
            if now >= deadline:
                if con.phase == "done":
                    break  # it said its status; a slow power-off is no hang
                where, limit = (("booting", deadlines.boot) if con.phase == "boot"
                                else ("running the command", deadlines.run))
                raise GuestHang(f"the guest hung {where} (not done after {limit:.0f} s)"
                                f"{_trouble(con)}", tuple(con.tail))
            for _key, _ in sel.select(timeout=min(1.0, deadline - now)):
                chunk = os.read(fd, 65536)
                if not chunk:
                    eof = True
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    before = con.phase
                    out = con.feed(raw.decode("utf-8", errors="replace"))
                    if out is not None:
                        on_output(out)
                    if before == "boot" and con.phase == "running":
                        deadline = time.monotonic() + deadlines.run
                    elif before == "running" and con.phase == "done":
                        deadline = time.monotonic() + deadlines.shutdown
        if pending and con.phase != "done":
            out = con.feed(pending.decode("utf-8", errors="replace"))
            if out is not None:
                on_output(out)
        if con.status is None:
            code = proc.poll()
            how = f"exit status {code}" if code is not None else "closed its console"
            raise GuestHang(f"the guest ended without finishing its command (QEMU {how})"
                            f"{_trouble(con)}", tuple(con.tail))
        return con.status, con
    finally:
        stop(proc)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the lab's process dies, even by SIGKILL
    (prctl PR_SET_PDEATHSIG; kept across exec)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _trouble(con: Console) -> str:
    return f"; kernel: {con.trouble[0]}" if con.trouble else (
        f"; last console line: {con.tail[-1].strip()[:160]}" if con.tail else "")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End QEMU and anything in its process group; reap it."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=3)
    _signal_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):  # an unkillable process
        proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
