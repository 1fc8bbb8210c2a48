"""This process's VMAs over a range, as ``kvm_arch_prepare_memory_region`` sees them in
``current->mm``.

Exact at every call, with no cache (no counter tells that the mappings changed): where the
kernel has the ``PROCMAP_QUERY`` ioctl on ``/proc/self/maps`` (Linux 6.11), one ioctl per VMA
of the range (``find_vma`` under ``mmap_read_lock``, as the arch walks); elsewhere
``/proc/self/maps`` read up to the first line past the range. ``VM_PFNMAP`` shows only in
``/proc/self/smaps``'s ``VmFlags``, which costs far more (it counts every VMA's pages): it is
read (up to the range) only when asked and only when a VMA of the range could be
``VM_PFNMAP``. One with neither a file nor a name cannot: ``VM_PFNMAP`` is set by a driver's
``f_op->mmap`` (``remap_pfn_range``, ``vmf_insert_pfn`` users) or given to a special mapping,
and special mappings are named (``[vvar]``)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import struct
import threading
from collections.abc import Iterable
from typing import NamedTuple

from ..engine.vmas import Vma, VmFlag
from .uapi import _IOWR

MAPS = "/proc/self/maps"
SMAPS = "/proc/self/smaps"

#: ``VmFlags`` mnemonics of ``show_smap_vma_flags`` (fs/proc/task_mmu.c) that the model reads.
_SMAPS_FLAGS = {"rd": VmFlag.READ, "wr": VmFlag.WRITE, "ex": VmFlag.EXEC,
                "sh": VmFlag.SHARED, "pf": VmFlag.PFNMAP}

#: One line of /proc/PID/maps: start, end, permissions, offset, device, inode, name.
_LINE = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) ([-rwxsp]{4}) \S+ (\S+) (\d+) *(.*)$",
                   re.MULTILINE)
_PERMS = ((ord("r"), VmFlag.READ), (ord("w"), VmFlag.WRITE), (ord("x"), VmFlag.EXEC),
          (ord("s"), VmFlag.SHARED))

# -- PROCMAP_QUERY (include/uapi/linux/fs.h, Linux 6.11) -------------------------------------
#: struct procmap_query: size, query_flags, query_addr, vma_start, vma_end, vma_flags,
#: vma_page_size (u32, then 4 bytes of padding), vma_offset, inode, dev_major, dev_minor,
#: vma_name_size, build_id_size, vma_name_addr, build_id_addr: 104 bytes.
_QUERY = struct.Struct("=QQQQQQI4xQQIIIIQQ")
PROCMAP_QUERY = _IOWR(ord("f"), 17, _QUERY.size)
_COVERING_OR_NEXT_VMA = 0x10
#: PROCMAP_QUERY_VMA_{READABLE,WRITABLE,EXECUTABLE,SHARED} (SHARED is VM_MAYSHARE, as the
#: ``s`` of /proc/PID/maps).
_QUERY_FLAGS = ((0x1, VmFlag.READ), (0x2, VmFlag.WRITE), (0x4, VmFlag.EXEC),
                (0x8, VmFlag.SHARED))
_PATH_MAX = 4096
#: Where the kernel copies a VMA's name: only its length is read (whether it has one).
_NAME = ctypes.create_string_buffer(_PATH_MAX)


class _Found(NamedTuple):
    """A VMA of the range, and whether it could be ``VM_PFNMAP`` (a file or a name)."""

    vma: Vma
    special: bool


def _perms(perms: bytes) -> VmFlag:
    flags = VmFlag.NONE
    for ch, flag in _PERMS:
        if ch in perms:
            flags |= flag
    return flags


def _span(line: str) -> tuple[int, int]:
    lo, _, hi = line.split(None, 1)[0].partition("-")
    return int(lo, 16), int(hi, 16)


def _maps_lines(lines: Iterable[bytes], start: int, end: int) -> list[_Found]:
    out = []
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            continue
        lo = int(m[1], 16)
        if lo >= end:
            break
        hi = int(m[2], 16)
        if hi <= start:
            continue
        special = m[4] != b"00:00" or m[5] != b"0" or bool(m[6].strip())
        out.append(_Found(Vma(lo, hi, _perms(m[3])), special))
    return out


def parse_maps(text: str | bytes, start: int, end: int) -> list[Vma]:
    """The VMAs of a ``/proc/PID/maps`` text meeting ``[start, end)``, flags from the
    permission column (``rwxs``/``rwxp``). The lines are in address order."""
    data = text.encode("ascii", "replace") if isinstance(text, str) else text
    return [f.vma for f in _maps_lines(data.splitlines(), start, end)]


def parse_smaps_flags(text: str | Iterable[str], starts: set[int],
                      end: int | None = None) -> dict[int, VmFlag]:
    """``VmFlags`` of the VMAs of a ``/proc/PID/smaps`` text (or its lines) that begin at
    ``starts``; with ``end``, the lines of VMAs from ``end`` on are not read."""
    out: dict[int, VmFlag] = {}
    current: int | None = None
    for line in text.splitlines() if isinstance(text, str) else text:
        if line.startswith("VmFlags:"):
            if current is not None:
                flags = VmFlag.NONE
                for word in line.split()[1:]:
                    flags |= _SMAPS_FLAGS.get(word, VmFlag.NONE)
                out[current] = flags
            current = None
        elif line[:1] in "0123456789abcdef" and "-" in line.split(None, 1)[0]:
            lo = _span(line)[0]
            if end is not None and lo >= end:
                break
            current = lo if lo in starts else None
    return out


class ProcessVmas:
    """Reads the calling process's VMAs. One ``/proc/self/maps`` descriptor per process
    (the file names the mm of the process that opened it: a forked child opens its own);
    ``query=False`` always reads the text (the fallback, and a way to test it)."""

    def __init__(self, *, query: bool = True, maps: str = MAPS, smaps: str = SMAPS) -> None:
        self.maps = maps
        self.smaps = smaps
        self._query = query
        self._lock = threading.Lock()
        self._fd = -1
        self._pid = 0

    def _descriptor(self) -> int:
        pid = os.getpid()
        with self._lock:
            if self._pid != pid:
                if self._fd >= 0 and self._pid:
                    os.close(self._fd)  # a forked child's copy of its parent's
                self._fd = os.open(self.maps, os.O_RDONLY | os.O_CLOEXEC)
                self._pid = pid
            return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0 and self._pid == os.getpid():
                os.close(self._fd)
            self._fd, self._pid = -1, 0

    def _queried(self, start: int, end: int) -> list[_Found] | None:
        """The range's VMAs by ``PROCMAP_QUERY``, or ``None`` where the kernel has none."""
        fd = self._descriptor()
        out: list[_Found] = []
        buf = bytearray(_QUERY.size)
        addr = start
        name_addr = ctypes.addressof(_NAME)
        while addr < end:
            _QUERY.pack_into(buf, 0, _QUERY.size, _COVERING_OR_NEXT_VMA, addr,
                             0, 0, 0, 0, 0, 0, 0, 0, _PATH_MAX, 0, name_addr, 0)
            try:
                fcntl.ioctl(fd, PROCMAP_QUERY, buf, True)
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # no VMA at or above addr
                    break
                if exc.errno in (errno.ENOTTY, errno.EINVAL) and not out:
                    self._query = False  # before 6.11 (or another ABI): read the text
                    return None
                raise
            (_, _, _, lo, hi, qflags, _, _, inode, major, minor,
             name_size, _, _, _) = _QUERY.unpack_from(buf)
            if lo >= end:
                break
            flags = VmFlag.NONE
            for bit, flag in _QUERY_FLAGS:
                if qflags & bit:
                    flags |= flag
            special = bool(inode or major or minor or name_size)
            out.append(_Found(Vma(lo, hi, flags), special))
            addr = hi
        return out

    def _read(self, start: int, end: int) -> list[_Found]:
        with open(self.maps, "rb") as f:  # line by line: what lies past the range is not read
            return _maps_lines(f, start, end)

    def vmas(self, start: int, end: int, *, pfnmap: bool = True) -> list[Vma]:
        """The VMAs meeting ``[start, end)`` in address order (``[]`` for an empty range),
        ``VM_PFNMAP`` included with ``pfnmap`` (from smaps, when a VMA could have it)."""
        if start >= end:
            return []
        found = self._queried(start, end) if self._query else None
        if found is None:
            found = self._read(start, end)
        vmas = [f.vma for f in found]
        starts = {f.vma.start for f in found if f.special}
        if not pfnmap or not starts:
            return vmas
        try:
            with open(self.smaps, encoding="ascii", errors="replace") as f:
                exact = parse_smaps_flags(f, starts, end)
        except OSError:  # no smaps (CONFIG_PROC_PAGE_MONITOR=n): the permissions are all
            return vmas
        return [v._replace(flags=exact.get(v.start, v.flags)) for v in vmas]


#: This process's reader (PROCMAP_QUERY where the kernel has it).
_PROCESS = ProcessVmas()


def read_vmas(start: int, end: int, *, pfnmap: bool = True) -> list[Vma]:
    """This process's VMAs meeting ``[start, end)`` in address order (``[]`` for an empty
    range); ``VM_PFNMAP`` with ``pfnmap`` (:class:`ProcessVmas`)."""
    return _PROCESS.vmas(start, end, pfnmap=pfnmap)
