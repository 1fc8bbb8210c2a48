"""Forking a VMM and calling the VM from the child (the ``fork`` trace record, which the
fuzzer generates and replay executes on any backend).

A forked child is not the VM's mm: every VM ioctl answers EIO (``kvm_vm_ioctl``'s
``kvm->mm != current->mm``), while ``/dev/kvm`` still answers system ioctls. The child makes
one call, reports its result over a pipe and exits; the parent reaps it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

from .. import constants as c
from ..backends.base import VM
from ..backends.dual import Divergence
from ..errors import KvmError, errno_name, errno_value

UA_BASE = 0x7F0000000000


class ForkFailed(Exception):
    """The child could not report (it crashed), or the model and the kernel disagreed in it
    (the message says which)."""


def child_call(vm: VM, call: str) -> str:
    """One call in a forked child; its outcome as text (``ok [VALUE]``, an errno name, or
    ``DIVERGENCE ...``)."""
    actions: dict[str, Callable[[], object]] = {
        "set_user_memory_region": lambda: vm.set_user_memory_region(
            11, 0, 0x7FF00000 * vm.page_size, vm.page_size, UA_BASE),
        "get_dirty_log": lambda: vm.get_dirty_log(0),
        "check_extension": lambda: vm.check_extension(c.KVM_CAP_USER_MEMORY),
        "create_vcpu": lambda: vm.create_vcpu(),
        "create_guest_memfd": lambda: vm.create_guest_memfd(vm.page_size),
        "enable_cap": lambda: vm.enable_cap(c.KVM_CAP_HALT_POLL, 0),
        "check_system_extension": lambda: vm.check_system_extension(c.KVM_CAP_NR_MEMSLOTS),
    }
    try:
        value = actions[call]()
    except KvmError as exc:
        return errno_name(exc.errno or 0)
    except Divergence as exc:
        return f"DIVERGENCE {exc}"
    return "ok" if value is None or isinstance(value, bytes) else f"ok {value}"


_libc: ctypes.CDLL | None = None


def fork_and_call(vm: VM, how: str, call: str) -> int:
    """Fork (``how``: ``os.fork``, or ``libc``: libc's ``fork()``, which runs no Python at-fork
    hook), make ``call`` in the child, reap it; returns the child's errno (0: it worked).
    :class:`ForkFailed` if the child failed or diverged."""
    global _libc
    read_end, write_end = os.pipe()
    try:
        if how == "libc":
            if _libc is None:
                _libc = ctypes.CDLL(None, use_errno=True)
            pid = int(_libc.fork())
            if pid < 0:
                raise OSError(ctypes.get_errno(), "fork")
        else:
            pid = os.fork()
    except BaseException:
        os.close(read_end)
        os.close(write_end)
        raise
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.write(write_end, child_call(vm, call).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            answer = pipe.read().decode()
    finally:
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not answer:
        raise ForkFailed(f"forked child failed (status {status:#x})")
    if answer.startswith("DIVERGENCE"):
        raise ForkFailed(f"in a forked child: {answer[11:]}")
    first = answer.split()[0]
    return 0 if first == "ok" else errno_value(first)
