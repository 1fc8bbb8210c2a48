"""Host mappings that back guest memory: anonymous, memfd (shareable with another process) or a
file, placed so that ``hva % align == gpa % align`` (over-allocate a reservation, map the
memory over it with ``MAP_FIXED``, trim the ends) — large pages need gpa and hva congruent
modulo the page size.

A mapping stays mapped while anything references it: :meth:`HostMapping.close` drops the
owner's reference (and closes the fd), and ``munmap`` runs when the last view or array derived
from :attr:`HostMapping.buffer` is gone, so a view can never point into unmapped memory.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
import weakref
from pathlib import Path
from typing import Any, Final

from ..constants import PAGE_SIZE
from .address import BackingKind, LayoutError

__all__ = ["HostMapping", "mapping_exists"]

_PROT_NONE: Final = 0
_MAP_FIXED: Final = 0x10
_MAP_NORESERVE: Final = 0x4000
_MAP_FIXED_NOREPLACE: Final = 0x100000
_MAP_FAILED: Final = (1 << 64) - 1
_MFD_CLOEXEC: Final = 1

_libc: Any = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_long,
        ]
        lib.munmap.restype = ctypes.c_int
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = lib
    return _libc


def _mmap(addr: int | None, size: int, prot: int, flags: int, fd: int = -1) -> int:
    result = _lib().mmap(addr, size, prot, flags, fd, 0)
    if result is None or result == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {size:#x} bytes failed: {os.strerror(err)}")
    return int(result)


def _munmap(addr: int, size: int) -> None:
    if size and _lib().munmap(addr, size) != 0:  # pragma: no cover - cannot fail for our ranges
        err = ctypes.get_errno()
        raise OSError(err, f"munmap({addr:#x}, {size:#x}): {os.strerror(err)}")


def mapping_exists(addr: int, size: int) -> bool:
    """Whether any page of ``[addr, addr + size)`` is mapped in this process (from
    /proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
            if lo < addr + size and addr < hi:
                return True
    return False


class HostMapping:
    """``size`` bytes of host memory for one region. ``backing`` is ``"anon"`` (private,
    ``MAP_NORESERVE``: untouched pages cost nothing), ``"memfd"`` (shared, :attr:`fd` can be
    passed to another process) or a file path (``MAP_SHARED`` over the file's first ``size``
    bytes; with ``private=True`` the file is opened read-only and mapped ``MAP_PRIVATE``, so
    host writes never reach it). ``align`` (a power of two) makes
    ``address % align == gpa % align``; ``below`` keeps the whole mapping under that address."""

    def __init__(
        self,
        size: int,
        *,
        backing: str | os.PathLike[str] = "anon",
        align: int | None = None,
        gpa: int = 0,
        name: str = "memslot-guest",
        private: bool = False,
        below: int | None = None,
    ) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise LayoutError(f"size {size:#x} must be a positive multiple of {PAGE_SIZE:#x}")
        if align is not None and (align < PAGE_SIZE or align & (align - 1)):
            raise LayoutError(f"align {align:#x} must be a power of two >= {PAGE_SIZE:#x}")
        self.size = size
        self.align = align
        #: Host writes stay in this process (a read-only file mapped ``MAP_PRIVATE``).
        self.private = False
        self.fd: int | None = None
        self.path: str | None = None
        self.kind: BackingKind
        flags = mmap.MAP_SHARED
        if backing == "anon":
            self.kind = "anon"
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        elif backing == "memfd":
            self.kind = "memfd"
            self.fd = os.memfd_create(name[:200] or "memslot-guest", _MFD_CLOEXEC)
            try:
                os.ftruncate(self.fd, size)
            except OSError:
                os.close(self.fd)
                raise
        elif isinstance(backing, str | os.PathLike):
            self.kind = "file"
            self.path = os.fspath(Path(backing).resolve())
            self.fd = self._open_file(self.path, size, private)
            if private:
                flags = mmap.MAP_PRIVATE
                self.private = True
        else:
            raise LayoutError(f"backing must be 'anon', 'memfd' or a file path, not {backing!r}")
        try:
            self.address = self._place(size, flags, align, gpa, below)
        except BaseException:
            if self.fd is not None:
                os.close(self.fd)
            raise
        array = (ctypes.c_char * size).from_address(self.address)
        finalizer = weakref.finalize(array, _munmap, self.address, size)
        finalizer.atexit = False  # the process is going away: leave live views valid
        self._finalizer: weakref.finalize[Any, Any] | None = finalizer
        self._buffer: memoryview | None = memoryview(array).cast("B")

    @staticmethod
    def _open_file(path: str, size: int, private: bool) -> int:
        try:
            fd = os.open(path, (os.O_RDONLY if private else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise LayoutError(f"cannot open backing file {path}: {exc.strerror}") from None
        length = os.fstat(fd).st_size
        if length < size:
            os.close(fd)
            raise LayoutError(
                f"backing file {path} has {length:#x} bytes, the region needs {size:#x}"
            )
        return fd

    def _place(self, size: int, flags: int, align: int | None, gpa: int,
               below: int | None) -> int:
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        fd = -1 if self.fd is None else self.fd
        step = align if align is not None and align > PAGE_SIZE else PAGE_SIZE
        span = size + (step if step > PAGE_SIZE else 0)
        reserve = self._reserve(span, below)
        target = reserve + ((gpa - reserve) % step)
        try:
            _mmap(target, size, prot, flags | _MAP_FIXED, fd)
        except BaseException:
            _munmap(reserve, span)
            raise
        _munmap(reserve, target - reserve)
        _munmap(target + size, reserve + span - target - size)
        return target

    @staticmethod
    def _reserve(span: int, below: int | None) -> int:
        """An inaccessible reservation of ``span`` bytes, ending at or below ``below`` (the
        VM's user address limit: a 64-bit host maps near 2^47, ppc64's KVM takes 2^46)."""
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        reserve = _mmap(None, span, _PROT_NONE, flags)
        if below is None or reserve + span <= below:
            return reserve
        _munmap(reserve, span)
        hint = (below - span - (1 << 30)) & ~((1 << 21) - 1)
        for _ in range(64):
            if hint <= 1 << 32:
                break
            try:
                return _mmap(hint, span, _PROT_NONE, flags | _MAP_FIXED_NOREPLACE)
            except OSError as exc:
                if exc.errno != _errno.EEXIST:
                    raise
            hint -= span + (1 << 30)
        raise LayoutError(f"no free host address range of {span:#x} bytes below {below:#x} "
                          "(the VM's user address limit)")

    # -- access ---------------------------------------------------------------------------
    @property
    def buffer(self) -> memoryview:
        """A writable byte view of the whole mapping (it keeps the mapping alive)."""
        if self._buffer is None:
            raise LayoutError("the mapping was released (its region was removed)")
        return self._buffer

    @property
    def closed(self) -> bool:
        return self._buffer is None

    @property
    def unmapped(self) -> bool:
        """True once ``munmap`` has run (no owner and no view left)."""
        return self._finalizer is None or not self._finalizer.alive

    def close(self) -> None:
        """Drop the owner's reference and close the fd (idempotent). The memory is unmapped
        at once unless views derived from :attr:`buffer` are still alive, then when the last
        one goes."""
        self._buffer = None
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError as exc:  # pragma: no cover - closed behind our back
                if exc.errno != _errno.EBADF:
                    raise
            self.fd = None

    def __repr__(self) -> str:
        state = "released" if self.closed else f"{self.address:#x}+{self.size:#x}"
        return f"HostMapping({self.kind}, {state})"
