"""The host process's VMAs as far as the model knows them.

Some arches' ``kvm_arch_prepare_memory_region`` walk the VMAs of the slot's host range in
``current->mm`` (``find_vma_intersection``) and refuse what those VMAs cannot back: riscv a
writable slot over a VMA without ``VM_WRITE`` (EPERM), riscv and arm64 dirty logging over a
``VM_PFNMAP`` VMA (EINVAL). The model has no ``mm``: it knows the ranges it was told of (host
mappings registered on the VM, or a real process's VMAs reported by the differential backend)
and treats every other address as unmapped, which no walk refuses."""

from __future__ import annotations

import bisect
import enum
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple


class VmFlag(enum.IntFlag):
    """The ``vm_flags`` bits the arch walks read (the model's own numbering)."""

    NONE = 0
    READ = 1
    WRITE = 2
    EXEC = 4
    SHARED = 8
    PFNMAP = 16


#: What ``mmap(PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)`` gives: guest RAM.
ANON_RW = VmFlag.READ | VmFlag.WRITE


class Vma(NamedTuple):
    """One ``vm_area_struct``: ``[start, end)`` with its flags."""

    start: int
    end: int
    flags: VmFlag

    def describe(self) -> str:
        names = "".join(ch if self.flags & f else "-" for ch, f in
                        (("r", VmFlag.READ), ("w", VmFlag.WRITE), ("x", VmFlag.EXEC)))
        names += "s" if self.flags & VmFlag.SHARED else "p"
        if self.flags & VmFlag.PFNMAP:
            names += " pfnmap"
        return f"VMA {self.start:#x}-{self.end:#x} {names}"


#: Reads a live process's VMAs meeting ``[start, end)`` in address order; the flag says
#: whether ``VM_PFNMAP`` is needed (it may cost more to find).
VmaReader = Callable[[int, int, bool], list[Vma]]


class VmaMap:
    """Non-overlapping known VMAs in address order (the part of ``mm->mm_mt`` the model was
    told). Lookups bisect; an update costs what it touches plus one list splice.

    With a :attr:`source` (a real process's VMAs, set by the differential backend), each
    :meth:`walk` first learns the walked range from it: the process is read only when an
    arch walk happens, never for a request refused before it or one no walk could refuse."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._vmas: list[Vma] = []
        self.source: VmaReader | None = None

    def __len__(self) -> int:
        return len(self._vmas)

    def __iter__(self) -> Iterator[Vma]:
        return iter(list(self._vmas))

    def _span(self, start: int, end: int) -> tuple[int, int]:
        """Indexes ``[lo, hi)`` of the VMAs that intersect ``[start, end)``."""
        lo = bisect.bisect_right(self._starts, start) - 1
        if lo < 0 or self._vmas[lo].end <= start:
            lo += 1
        hi = bisect.bisect_left(self._starts, end, lo)
        return lo, hi

    def forget(self, start: int, end: int) -> None:
        """Know nothing of ``[start, end)`` any more (VMAs straddling an edge are cut)."""
        if start >= end:
            return
        lo, hi = self._span(start, end)
        keep: list[Vma] = []
        if lo < hi:
            first, last = self._vmas[lo], self._vmas[hi - 1]
            if first.start < start:
                keep.append(first._replace(end=start))
            if last.end > end:
                keep.append(last._replace(start=end))
        self._vmas[lo:hi] = keep
        self._starts[lo:hi] = [v.start for v in keep]

    def map(self, start: int, end: int, flags: VmFlag) -> None:
        """Record one VMA over ``[start, end)``, replacing what was known there."""
        if start >= end:
            raise ValueError(f"empty VMA {start:#x}-{end:#x}")
        self.forget(start, end)
        index = bisect.bisect_left(self._starts, start)
        self._vmas.insert(index, Vma(start, end, flags))
        self._starts.insert(index, start)

    def replace(self, start: int, end: int, vmas: Iterable[Vma]) -> None:
        """Make ``vmas`` (cut to ``[start, end)``) all that is known of that range: a real
        process's VMAs there, the gaps between them unmapped."""
        self.forget(start, end)
        for vma in vmas:
            lo, hi = max(vma.start, start), min(vma.end, end)
            if lo < hi:
                self.map(lo, hi, vma.flags)

    def walk(self, start: int, end: int, pfnmap: bool) -> list[Vma]:
        """What ``find_vma_intersection`` visits over ``[start, end)`` in an arch walk: the
        :attr:`source`'s VMAs there when one is set (and then known), else the known ones.
        ``pfnmap``: the walk reads ``VM_PFNMAP``."""
        if self.source is not None:
            self.replace(start, end, self.source(start, end, pfnmap))
        return self.intersecting(start, end)

    def intersecting(self, start: int, end: int) -> list[Vma]:
        """The known VMAs meeting ``[start, end)`` in address order: the successive answers
        of ``find_vma_intersection`` as the arch walks advance past each one."""
        lo, hi = self._span(start, end)
        return self._vmas[lo:hi]
