"""Record the KVM calls of any VMM by running it under strace (``memslot record``).

strace (``-f -y -X raw``) traces ``ioctl`` and the calls that make, copy and drop descriptors
and threads, and writes its log into a FIFO this module reads line by line and copies to the
output. strace decodes ``KVM_SET_USER_MEMORY_REGION`` but prints only the pointer of
``KVM_SET_USER_MEMORY_REGION2``, ``KVM_CREATE_GUEST_MEMFD``, ``KVM_ENABLE_CAP`` and the dirty-log
ioctls, so the recorder reads those structs (and a ``KVM_CLEAR_DIRTY_LOG`` bitmap) from
``/proc/TID/mem`` and writes them after the call's line in strace's dump format
(:func:`memslot.trace.strace.format_dump`). How the thread is held while it reads:

* A command (``memslot record -- CMD``): strace starts under a seccomp user-notification
  filter on exactly those requests (:mod:`memslot.harness.seccomp_notify`), inherited by the
  VMM and everything it starts. Each such ioctl stops its thread at the entry until the
  recorder has read the struct and answered, however long that takes on a busy host; the
  kernel then runs the call unchanged. Nothing is missed, and no other call is slowed
  (``KVM_RUN`` included).
* ``--pid`` (a filter cannot be added to a running process), or ``timed=True``: strace holds
  every ioctl at its exit for ``hold_ms`` (``-e inject=ioctl:delay_exit=``); the line is
  written before the hold, and while the thread is held the recorder reads. A read counts
  only when ``/proc/TID/syscall`` shows the same ioctl before and after it and the thread's
  context-switch counts did not move; a read that came too late is missed. This costs
  ``hold_ms`` per ioctl and, on a busy host, can miss.

A struct that could not be read is never silent: a `` | memslot record: ...`` line after the
call's line says why (the parser reports that call as malformed, naming the cause), and
:class:`Recording` counts it.

Stopping: SIGINT or SIGTERM is passed on to the traced command (``--pid``: strace detaches);
strace ends when its tracees do, and every line it wrote is in the output. A second signal, or
``grace`` seconds without an exit, kills the command (or strace).
"""

from __future__ import annotations

import contextlib
import os
import platform
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TextIO

from ..backends import uapi
from ..trace.strace import (
    RAW_REQUESTS,
    CallReader,
    LineError,
    format_dump,
    format_missed,
    ioctl_pointer,
)
from . import seccomp_notify

#: What strace traces: ioctls, and what makes, copies and drops descriptors and threads.
TRACED = ("ioctl", "open", "openat", "close", "close_range", "dup", "dup2", "dup3", "fcntl",
          "clone", "clone3", "fork", "vfork", "execve")
DEFAULT_HOLD_MS = 50.0
#: ``__NR_ioctl`` of the host (/proc/TID/syscall names the call by number); unknown: not checked.
NR_IOCTL = {"x86_64": 16, "aarch64": 29, "riscv64": 29, "ppc64le": 54, "ppc64": 54,
            "s390x": 54}.get(platform.machine())
MAX_BITMAP = 1 << 20


class RecordError(Exception):
    """The recording could not start (strace missing, bad pid, ...): one line."""


def find_strace() -> str:
    """The strace executable, or :class:`RecordError` saying how to get it."""
    path = shutil.which("strace")
    if path is None:
        raise RecordError("strace is not installed (Debian: apt-get install strace, or "
                          "`make deps-record` in the memslot sources)")
    return path


@dataclass
class Recording:
    """What a recording produced."""

    lines: int = 0
    dumped: int = 0
    missed: list[int] = field(default_factory=list)  # output line numbers without their bytes
    status: int | None = None  # strace's exit status (the command's, when it ran one)
    stopped_by: str | None = None
    hold: str = "none"  # "seccomp" | "timed" | "none": how threads were held for reads


@dataclass(frozen=True, slots=True)
class _Held:
    """What the recorder read from a thread stopped at a call's entry."""

    fd: int
    request: int
    address: int
    data: bytes | None
    why: str = ""


def strace_command(strace: str, fifo: str, hold_ms: float, target: Sequence[str] | int,
                   ) -> list[str]:
    """The strace command line (``target``: a command, or a pid to attach to; ``hold_ms``:
    the timed hold, 0 for none)."""
    cmd = [strace, "-f", "-q", "-X", "raw", "-y", "-e", "signal=none",
           "-e", "trace=" + ",".join(TRACED)]
    if hold_ms > 0:
        cmd += ["-e", f"inject=ioctl:delay_exit={max(1, round(hold_ms * 1000))}"]
    cmd += ["-o", fifo]
    if isinstance(target, int):
        return [*cmd, "-p", str(target)]
    return [*cmd, "--", *target]


def _proc(tid: int, name: str) -> str | None:
    try:
        with open(f"/proc/{tid}/{name}", encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _switches(tid: int) -> tuple[str, str] | None:
    """``(state, context switches)`` of a thread, from /proc/TID/status."""
    text = _proc(tid, "status")
    if text is None:
        return None
    state, switches = "", []
    for line in text.splitlines():
        if line.startswith("State:"):
            state = line.split()[1]
        elif "ctxt_switches:" in line:
            switches.append(line.split()[-1])
    return state, ",".join(switches)


def _in_call(tid: int, fd: int, request: int, address: int) -> bool:
    text = _proc(tid, "syscall")
    if text is None:
        return False
    parts = text.split()
    if len(parts) < 4 or (NR_IOCTL is not None and parts[0] != str(NR_IOCTL)):
        return False
    try:
        return (int(parts[1], 16) & 0xFFFFFFFF == fd & 0xFFFFFFFF
                and int(parts[2], 16) & 0xFFFFFFFF == request
                and int(parts[3], 16) == address)
    except ValueError:
        return False


def read_argument(tid: int, request: int, address: int) -> bytes:
    """The ``_IOC_SIZE`` argument bytes of ioctl ``request`` at ``address`` in thread ``tid``
    (and a ``KVM_CLEAR_DIRTY_LOG`` bitmap after them); ``OSError`` if they cannot be read."""
    size = (request >> 16) & 0x3FFF
    with open(f"/proc/{tid}/mem", "rb", buffering=0) as mem:
        data = os.pread(mem.fileno(), size, address)
        if request == uapi.KVM_CLEAR_DIRTY_LOG and len(data) == size:
            _, num, _, bitmap = struct.unpack_from("<IIQQ", data)
            want = ((num + 63) // 64) * 8
            if bitmap and 0 < want <= MAX_BITMAP:
                data += os.pread(mem.fileno(), want, bitmap)
    if len(data) < size:
        raise OSError(f"{len(data)} of {size} bytes")
    return data


def read_held(tid: int, fd: int, request: int, address: int) -> bytes | None:
    """The argument bytes of an ioctl thread ``tid`` is held in (timed hold), or ``None`` if
    the thread was not provably held at that call for the whole read."""
    before = _switches(tid)
    if before is None or before[0] != "t" or not _in_call(tid, fd, request, address):
        return None
    try:
        data = read_argument(tid, request, address)
    except OSError:
        return None
    if _switches(tid) != before or not _in_call(tid, fd, request, address):
        return None
    return data


class Recorder:
    """Runs strace on a command (or a pid) and writes its log, with argument dumps, to
    ``out``."""

    def __init__(self, out: TextIO, hold_ms: float = DEFAULT_HOLD_MS, grace: float = 10.0,
                 strace: str | None = None, timed: bool = False) -> None:
        """``timed``: hold every ioctl for ``hold_ms`` even for a command (as for a pid)
        instead of the seccomp hold; ``hold_ms=0`` with it: read nothing."""
        self.out = out
        self.hold_ms = hold_ms
        self.grace = grace
        self.timed = timed
        self.strace = strace or find_strace()
        self.result = Recording()
        self._calls = CallReader()
        self._fd: int | None = None
        self._listener: int | None = None  # the seccomp hold's notifications
        self._held: dict[int, _Held] = {}  # tid -> what was read at its current call's entry
        self._buffer = b""  # a line strace has not finished
        self._queue: deque[bytes] = deque()  # lines read, not handled yet

    # -- the log ----------------------------------------------------------------------------
    def _emit(self, text: str) -> None:
        self.out.write(text)
        self.result.lines += 1

    def _line(self, line: str) -> None:
        self._emit(line)
        try:
            call = self._calls.feed(line, self.result.lines)
        except LineError:  # copied as it is; the parser reports it
            return
        for tid in self._calls.exited:
            self._held.pop(tid, None)
        self._calls.exited.clear()
        if call is None or call.name != "ioctl" or call.ret.startswith("?"):
            return  # not a completed ioctl (a restarted one comes again)
        if self.result.hold == "none":
            return
        found = ioctl_pointer(call)
        if found is None or found[1] not in RAW_REQUESTS:
            return
        fd, request, address = found
        data, why = None, ""
        if self.result.hold == "seccomp":
            held = self._held.pop(call.tid, None)
            if held is None:
                why = "the thread was not stopped at the call (outside the seccomp filter)"
            elif (held.fd & 0xFFFFFFFF, held.request, held.address) != (
                    fd & 0xFFFFFFFF, request, address):
                why = "the thread was stopped at another call"
            else:
                data, why = held.data, held.why
        else:
            data = read_held(call.tid, fd, request, address) if address else None
            if data is not None and self._moved_on(call.tid):
                data = None  # held, but at a later call: its line is already out
            if data is None:
                why = (f"the timed hold ({self.hold_ms:g} ms) ended before the read"
                       if address else "NULL argument")
        if data is None:
            self.result.missed.append(self.result.lines)
            self._emit(format_missed(why))
            return
        for dump in format_dump(data):
            self._emit(dump)
        self.result.dumped += 1

    def _notified(self) -> None:
        """Read the struct of a thread the seccomp filter stopped, then let its call run."""
        assert self._listener is not None
        note = seccomp_notify.receive(self._listener)
        if note is None:
            return
        data: bytes | None = None
        why = ""
        try:
            if not note.address:
                why = "NULL argument"
            else:
                try:
                    data = read_argument(note.tid, note.request, note.address)
                except OSError as exc:
                    why = f"unreadable argument: {exc.strerror or exc}"
                if not seccomp_notify.still_waiting(self._listener, note.id):
                    data, why = None, "the thread left the call while it was read"
        finally:
            seccomp_notify.release(self._listener, note.id)
        self._held[note.tid] = _Held(note.fd, note.request, note.address, data, why)

    def _pull(self) -> None:
        """Queue what strace has written so far, without handling it."""
        while self._fd is not None:
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                return
            self._buffer += chunk
            *lines, self._buffer = self._buffer.split(b"\n")
            self._queue.extend(lines)

    def _moved_on(self, tid: int) -> bool:
        """Whether strace has written a later line of thread ``tid`` (it writes a call's line
        before holding it, so a thread held at a later call shows that line by now)."""
        self._pull()
        prefix = f"{tid} ".encode()
        return self._buffer.startswith(prefix) or any(x.startswith(prefix) for x in self._queue)

    def _drain(self) -> None:
        self._pull()
        while self._queue:
            self._line(self._queue.popleft().decode("utf-8", "surrogateescape") + "\n")
        self.out.flush()

    # -- running ----------------------------------------------------------------------------
    def record(self, target: Sequence[str] | int) -> Recording:
        """Record until the command exits (or, attached, until stopped by a signal)."""
        seccomp = (not self.timed and not isinstance(target, int)
                   and notify_available(self.strace))
        self.result.hold = ("seccomp" if seccomp else "timed" if self.hold_ms > 0 else "none")
        workdir = tempfile.mkdtemp(prefix="memslot-record-")
        fifo = os.path.join(workdir, "strace.fifo")
        os.mkfifo(fifo, 0o600)
        # Read and write ends both ours: opening never blocks, and the end is strace's exit.
        fd = self._fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        mine, theirs = socket.socketpair() if seccomp else (None, None)
        try:
            hold = self.hold_ms if self.result.hold == "timed" else 0
            preexec = None if theirs is None else _filter_and_send(theirs)
            try:
                proc = subprocess.Popen(strace_command(self.strace, fifo, hold, target),
                                        preexec_fn=preexec)
            except (OSError, subprocess.SubprocessError) as exc:
                raise RecordError(f"cannot run strace: {getattr(exc, 'strerror', None) or exc}"
                                  ) from None
            if mine is not None:
                assert theirs is not None
                theirs.close()
                _, fds, _, _ = socket.recv_fds(mine, 16, 1)
                if not fds:
                    proc.kill()
                    proc.wait()
                    raise RecordError("cannot run strace under the seccomp filter")
                self._listener = fds[0]
            niceness = _boost()
            try:
                self._loop(proc, fd, target)
            finally:
                _unboost(niceness)
        finally:
            self._fd = None
            os.close(fd)
            if self._listener is not None:
                os.close(self._listener)
                self._listener = None
            for sock in (mine, theirs):
                if sock is not None:
                    sock.close()
            os.unlink(fifo)
            os.rmdir(workdir)
        if self._buffer:
            self._line(self._buffer.decode("utf-8", "surrogateescape") + "\n")
            self._buffer = b""
        self.out.flush()
        return self.result

    def _loop(self, proc: subprocess.Popen[bytes], fd: int, target: Sequence[str] | int) -> None:
        signals: list[int] = []
        deadline: list[float] = []

        def on_signal(signum: int, frame: FrameType | None) -> None:
            signals.append(signum)
            self.result.stopped_by = signal.Signals(signum).name
            first = len(signals) == 1
            if first:
                deadline.append(time.monotonic() + self.grace)
            self._stop(proc, target, signum, force=not first)

        previous = _install({signal.SIGINT: on_signal, signal.SIGTERM: on_signal})
        try:
            watched = [fd] if self._listener is None else [self._listener, fd]
            while True:
                ready, _, _ = select.select(watched, [], [], 0.1)
                if self._listener is not None and self._listener in ready:
                    # strace wrote the line of a thread's previous call before letting it
                    # run on to this one: the log first, so that the line finds its bytes.
                    self._drain()
                    self._notified()
                if fd in ready:
                    self._drain()
                if proc.poll() is not None:
                    self._drain()
                    break
                if deadline and time.monotonic() > deadline[0]:
                    deadline.clear()
                    self._stop(proc, target, signal.SIGKILL, force=True)
            self.result.status = proc.returncode
        finally:
            _install(previous)
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def _stop(self, proc: subprocess.Popen[bytes], target: Sequence[str] | int, signum: int,
              force: bool) -> None:
        """Pass a stop on: to the command (strace then ends with it), or, attached, to strace
        (it detaches). ``force``: kill."""
        try:
            if isinstance(target, int):
                proc.send_signal(signal.SIGKILL if force and signum == signal.SIGKILL
                                 else signal.SIGINT)
                return
            children = _children(proc.pid)
            if not children:
                proc.send_signal(signal.SIGKILL if force else signal.SIGTERM)
                return
            for child in children:
                os.kill(child, signal.SIGKILL if force else signum)
        except (ProcessLookupError, PermissionError):
            pass


def notify_available(strace: str) -> bool:
    """Whether this host lets the recorder start strace under the seccomp filter (probed on
    a short-lived child)."""
    try:
        subprocess.run([strace, "-V"], preexec_fn=_probe, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _probe() -> None:
    os.close(seccomp_notify.install(sorted(RAW_REQUESTS)))


def _filter_and_send(sock: socket.socket) -> Any:
    """The ``preexec_fn`` that installs the filter in strace's process (before it runs, so
    inherited by the VMM it starts) and sends the listener to the recorder."""

    def preexec() -> None:
        listener = seccomp_notify.install(sorted(RAW_REQUESTS))
        socket.send_fds(sock, [b"L"], [listener])
        os.close(listener)

    return preexec


def _boost() -> int | None:
    """Run this process (not strace, not the VMM) ahead of ordinary work, where allowed, so
    that a held call is read within its hold on a busy host; returns the old niceness."""
    try:
        old = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, max(-20, old - 10))
    except OSError:
        return None
    return old


def _unboost(old: int | None) -> None:
    if old is not None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, old)


def _children(pid: int) -> list[int]:
    text = _proc(pid, f"task/{pid}/children")
    return [int(p) for p in text.split()] if text else []


def _install(handlers: dict[signal.Signals, Any]) -> dict[signal.Signals, Any]:
    """Set signal handlers; returns the previous ones (to set back the same way)."""
    return {signum: signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            for signum, handler in handlers.items()}
