"""Which process is calling, for ``kvm_vm_ioctl``'s ``kvm->mm != current->mm`` check: a VM
remembers the mm that made it, and a forked child (``os.fork`` or libc's ``fork()``, which
runs no Python hook) has an mm of its own.

The mm is a random tag kept in a page mapped ``MADV_WIPEONFORK`` (Linux 4.14): the kernel
hands a child that page zeroed, so the first look in a child finds no tag and makes a new
one. Reading the tag is a memory read; ``getpid()``, which tells a child apart too, is a
system call (about 0.3 us, on every request of a replay). Where the mapping cannot be made
(another system), the tag is the pid with Python's fork count, as before.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from typing import Final


def _wipe_on_fork_page() -> memoryview | None:
    """A page the kernel zeroes in a forked child, as one unsigned 64-bit word."""
    # Python's mmap module names MADV_WIPEONFORK only from 3.12 (Linux's value is 18).
    advice = getattr(mmap, "MADV_WIPEONFORK", 18 if sys.platform == "linux" else None)
    if advice is None:
        return None
    try:
        # Private: the kernel refuses MADV_WIPEONFORK on a shared mapping (EINVAL), and an
        # anonymous mmap.mmap is shared unless told otherwise.
        page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        page.madvise(advice)
    except (OSError, ValueError):
        return None
    return memoryview(page).cast("Q")


_TAG: Final = _wipe_on_fork_page()
_forks = 0  # forks Python saw (the fallback's part; libc's fork is told by the pid)
_arming = threading.Lock()


def _after_fork_in_child() -> None:
    global _forks, _arming
    _forks += 1
    _arming = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def current() -> int:
    """The calling process's mm tag (non-zero; another value in every forked child)."""
    tag = _TAG
    if tag is None:
        return (_forks << 32) | os.getpid()
    value: int = tag[0]
    if value:
        return value
    # (below 2^62: compiled code keeps it a small int, not a boxed one)
    fresh = int.from_bytes(os.urandom(8), "little") & ((1 << 62) - 1) | 1
    with _arming:  # two threads of a new child agree on one tag
        value = tag[0]
        if not value:
            tag[0] = value = fresh
    return value


__all__ = ["current"]
