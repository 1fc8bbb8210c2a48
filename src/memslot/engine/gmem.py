"""guest_memfd files of the model (virt/kvm/guest_memfd.c ``kvm_gmem_create``,
``kvm_gmem_bind``, ``kvm_gmem_release``). A model guest_memfd is backed by a real, empty
memfd so that its number is unique in the process, the kernel's "is this fd open" distinction
(EBADF vs EINVAL) is answered from the process's real fd table, and a number closed behind the
model's back and reused by another file is recognised (the memfd's inode identifies it)."""

from __future__ import annotations

import os
import threading

from .sorted_ints import SortedInts

GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1


class GuestMemfd:
    """One guest_memfd: size, flags, owner VM and the page ranges bound to slots."""

    __slots__ = ("_bound", "_starts", "fd", "flags", "identity", "owner", "size")

    def __init__(self, fd: int, size: int, flags: int, owner: object) -> None:
        self.fd = fd
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)
        self.size = size
        self.flags = flags
        self.owner = owner
        self._starts = SortedInts()
        self._bound: dict[int, tuple[int, tuple[int, int]]] = {}  # start -> (end, slot key)

    def range_bound(self, start: int, end: int) -> bool:
        """Whether any page in ``[start, end)`` is bound (``xa_find`` on the bindings)."""
        prev = self._starts.lt(end)
        return prev is not None and self._bound[prev][0] > start

    def bind(self, start: int, end: int, key: tuple[int, int]) -> None:
        self._starts.add(start)
        self._bound[start] = (end, key)

    def unbind(self, start: int, key: tuple[int, int]) -> None:
        """Drop the binding at ``start`` if it is still ``key``'s (after ``kvm_gmem_release``
        there is none: the slot's file is NULL and ``kvm_gmem_unbind`` does nothing)."""
        bound = self._bound.get(start)
        if bound is not None and bound[1] == key:
            self._starts.remove(start)
            del self._bound[start]

    def release(self) -> None:
        """``kvm_gmem_release``: every binding is invalidated."""
        self._starts = SortedInts()
        self._bound.clear()

    @property
    def bindings(self) -> list[tuple[int, int, tuple[int, int]]]:
        return [(s, *self._bound[s]) for s in self._starts]


_registry: dict[int, GuestMemfd] = {}
_registry_lock = threading.Lock()


def create(size: int, flags: int, owner: object) -> GuestMemfd:
    fd = os.memfd_create("memslot-gmem", os.MFD_CLOEXEC)
    g = GuestMemfd(fd, size, flags, owner)
    with _registry_lock:
        _registry[fd] = g
    return g


def lookup(fd: int) -> GuestMemfd | None:
    """The open guest_memfd numbered ``fd`` (``fget`` + the ``f_op`` test), or ``None``. A
    registered number whose file was closed behind the model's back is released here."""
    g = _registry.get(fd)
    if g is None:
        return None
    try:
        st = os.fstat(fd)
        same = (st.st_dev, st.st_ino) == g.identity
    except OSError:
        same = False
    if not same:
        with _registry_lock:
            if _registry.get(fd) is g:
                del _registry[fd]
        g.release()
        return None
    return g


def fd_is_open(fd: int) -> bool:
    """Whether ``fd`` is open in this process (``fdget`` takes the u32 as an unsigned int; a
    number past any fd table, e.g. 0xffffffff, is simply not open: EBADF, not a crash)."""
    if not 0 <= fd <= 0x7FFFFFFF:
        return False
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def close(g: GuestMemfd) -> None:
    """Close the file (``kvm_gmem_release`` runs: its bindings are invalidated)."""
    with _registry_lock:
        if _registry.get(g.fd) is g:
            del _registry[g.fd]
            os.close(g.fd)
    g.release()
