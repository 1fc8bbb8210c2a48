"""A seccomp user-notification filter on chosen ioctls: the hold ``memslot record`` reads
argument structs under.

A process that installs :func:`install` (and every process it starts) stops at the entry of
an ``ioctl`` whose request is one of the chosen ones, until the holder of the listener
descriptor answers: the thread waits in the kernel (``seccomp_do_user_notification``), so its
argument memory can be read at leisure from ``/proc/TID/mem``, however busy the host, and
:func:`still_waiting` proves afterwards that it had not moved. :func:`release` lets the call
run as if nothing had happened (``SECCOMP_USER_NOTIF_FLAG_CONTINUE``, Linux 5.5). Other system
calls and ioctls are not affected. The uapi is ``include/uapi/linux/seccomp.h``; the filter is
classic BPF over ``struct seccomp_data``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass

# machine -> (__NR_seccomp, __NR_ioctl, AUDIT_ARCH_*)
_ARCHES = {
    "x86_64": (317, 16, 0xC000003E),
    "aarch64": (277, 29, 0xC00000B7),
    "riscv64": (277, 29, 0xC00000F3),
    "ppc64le": (358, 54, 0xC0000015),
    "ppc64": (358, 54, 0x80000015),
    "s390x": (348, 54, 0x80000016),
}
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
PR_SET_NO_NEW_PRIVS = 38
_NOTIF = struct.Struct("=QII iIQ6Q")  # struct seccomp_notif (with its seccomp_data): 80 bytes
_RESP = struct.Struct("=QqiI")  # struct seccomp_notif_resp: 24 bytes
SECCOMP_IOCTL_NOTIF_RECV = 0xC0000000 | (_NOTIF.size << 16) | (ord("!") << 8) | 0
SECCOMP_IOCTL_NOTIF_SEND = 0xC0000000 | (_RESP.size << 16) | (ord("!") << 8) | 1
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40000000 | (8 << 16) | (ord("!") << 8) | 2
# classic BPF
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
_MAX_JUMP = 255


class NotifyUnavailable(OSError):
    """The kernel, the machine or the permissions do not allow the filter."""


@dataclass(frozen=True, slots=True)
class Notification:
    """A thread stopped at the entry of a chosen ioctl."""

    id: int
    tid: int
    fd: int
    request: int
    address: int


def _arch() -> tuple[int, int, int]:
    found = _ARCHES.get(platform.machine())
    if found is None:
        raise NotifyUnavailable(errno.ENOSYS, f"no seccomp table for {platform.machine()}")
    return found


def program(requests: Iterable[int]) -> bytes:
    """The filter: ``ioctl`` of the native ABI with one of ``requests`` (its low 32 bits, the
    kernel's ``unsigned int cmd``) -> USER_NOTIF; everything else -> ALLOW."""
    _, nr_ioctl, audit_arch = _arch()
    wanted = sorted(set(requests))
    if not 0 < len(wanted) < _MAX_JUMP - 2:
        raise ValueError(f"{len(wanted)} requests: between 1 and {_MAX_JUMP - 3}")
    cmd = 16 + 8 + (0 if sys.byteorder == "little" else 4)  # offsetof(args[1]) low half
    n = len(wanted)
    # 0 ld arch; 1 jeq; 2 ld nr; 3 jeq; 4 ld cmd; 5..5+n-1 jeq each; allow; notify
    allow = 5 + n
    code = [
        (_LD_W_ABS, 0, 0, 4),
        (_JEQ_K, 0, allow - 2, audit_arch),
        (_LD_W_ABS, 0, 0, 0),
        (_JEQ_K, 0, allow - 4, nr_ioctl),
        (_LD_W_ABS, 0, 0, cmd),
    ]
    for i, request in enumerate(wanted):
        here = 5 + i
        code.append((_JEQ_K, allow + 1 - here - 1, 0, request & 0xFFFFFFFF))
    code += [(_RET_K, 0, 0, SECCOMP_RET_ALLOW), (_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF)]
    return b"".join(struct.pack("=HBBI", *ins) for ins in code)


def install(requests: Iterable[int]) -> int:
    """Install the filter on the calling thread (inherited by every child it forks) and return
    the listener descriptor. Without CAP_SYS_ADMIN, sets ``no_new_privs`` first (as seccomp
    requires)."""
    nr_seccomp, _, _ = _arch()
    code = program(requests)
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(code, len(code))

    class _Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = _Prog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    for attempt in range(2):
        fd = libc.syscall(ctypes.c_long(nr_seccomp), ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
                          ctypes.c_uint(SECCOMP_FILTER_FLAG_NEW_LISTENER), ctypes.byref(prog))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err == errno.EACCES and attempt == 0:
            if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                break
            continue
        break
    raise NotifyUnavailable(err, f"seccomp user notification: {os.strerror(err)}")


def receive(listener: int) -> Notification | None:
    """The next notification (blocks until one is pending: poll the listener first);
    ``None`` if its thread went away before it could be received."""
    buf = bytearray(_NOTIF.size)
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, buf)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EINTR):
            return None
        raise
    ident, tid, *_, a0, a1, a2, _a3, _a4, _a5 = _NOTIF.unpack(buf)
    return Notification(ident, tid, a0 & 0xFFFFFFFF, a1 & 0xFFFFFFFF, a2)


def still_waiting(listener: int, ident: int) -> bool:
    """Whether the thread of notification ``ident`` is still stopped waiting for its answer."""
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("=Q", ident))
    except OSError:
        return False
    return True


def release(listener: int, ident: int) -> None:
    """Let the call of notification ``ident`` run (a thread gone since is not an error)."""
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND,
                    bytearray(_RESP.pack(ident, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)))
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
