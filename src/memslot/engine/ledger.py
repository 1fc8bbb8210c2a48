"""The allocation ledger: every allocation the kernel makes for memslots, live until the step
that frees it, with fault injection (``ENOMEM`` on the nth allocation).

Sizes follow the kernel's allocators: ``kzalloc`` for slot structs (not in VmallocUsed),
``__vcalloc`` (vmalloc) for dirty bitmaps and per-arch arrays. A vmalloc area of ``n`` pages
also needs its ``area->pages`` pointer array (``8 * n`` bytes); when that exceeds a page it is
itself vmalloc'd (mm/vmalloc.c ``__vmalloc_area_node``) and counts in /proc/meminfo VmallocUsed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Final

KMALLOC: Final = "kmalloc"
VMALLOC: Final = "vmalloc"

# Allocation kinds (``inject_enomem(kind=...)`` counts only these).
KIND_SLOT: Final = "slot"
KIND_INVALID_SLOT: Final = "invalid_slot"
KIND_DIRTY_BITMAP: Final = "dirty_bitmap"
KIND_RMAP: Final = "rmap"
KIND_LPAGE_INFO: Final = "lpage_info"
KIND_WRITE_TRACK: Final = "write_track"
KIND_PPC_RMAP: Final = "ppc_rmap"
KINDS: Final = (
    KIND_SLOT,
    KIND_INVALID_SLOT,
    KIND_DIRTY_BITMAP,
    KIND_RMAP,
    KIND_LPAGE_INFO,
    KIND_WRITE_TRACK,
    KIND_PPC_RMAP,
)

_LEVEL_NAMES: Final = {1: "4K", 2: "2M", 3: "1G"}


def vmalloc_footprint(nbytes: int, page_size: int = 4096) -> int:
    """Bytes by which VmallocUsed grows for one vmalloc of ``nbytes`` (pages, plus the page
    pointer array when that array is itself vmalloc'd, recursively)."""
    pages = -(-nbytes // page_size)
    total = pages * page_size
    array = 8 * pages
    if array > page_size:
        total += vmalloc_footprint(array, page_size)
    return total


def kmalloc_bucket(nbytes: int) -> int:
    """The kmalloc size class ``kzalloc(nbytes)`` is served from (SLUB, 4 KiB pages)."""
    for size in (8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192):
        if nbytes <= size:
            return size
    return 1 << (nbytes - 1).bit_length()


class Allocation:
    """One kernel allocation. Identity matters (two equal-sized arrays are distinct)."""

    __slots__ = (
        "allocator",
        "as_id",
        "bytes",
        "entries",
        "entry_size",
        "kind",
        "level",
        "serial",
        "slot_id",
        "vmalloc_bytes",
    )

    def __init__(
        self,
        serial: int,
        kind: str,
        as_id: int,
        slot_id: int,
        entries: int,
        entry_size: int,
        allocator: str,
        level: int,
        page_size: int,
    ) -> None:
        self.serial = serial
        self.kind = kind
        self.as_id = as_id
        self.slot_id = slot_id
        self.entries = entries
        self.entry_size = entry_size
        self.bytes = entries * entry_size
        self.allocator = allocator
        self.level = level
        self.vmalloc_bytes = (
            vmalloc_footprint(self.bytes, page_size) if allocator == VMALLOC else 0
        )

    @property
    def label(self) -> str:
        """``rmap[2M]``, ``dirty_bitmap``, ..."""
        if self.level:
            return f"{self.kind}[{_LEVEL_NAMES.get(self.level, self.level)}]"
        return self.kind

    @property
    def owner(self) -> tuple[int, int]:
        return (self.as_id, self.slot_id)

    def as_dict(self) -> dict[str, object]:
        return {
            "serial": self.serial,
            "kind": self.kind,
            "level": self.level,
            "owner": [self.as_id, self.slot_id],
            "entries": self.entries,
            "entry_size": self.entry_size,
            "bytes": self.bytes,
            "allocator": self.allocator,
            "vmalloc_bytes": self.vmalloc_bytes,
        }

    def __repr__(self) -> str:
        return (
            f"<Allocation #{self.serial} {self.label} of {self.as_id}:{self.slot_id} "
            f"{self.entries}x{self.entry_size}B={self.bytes}B {self.allocator}>"
        )


class Ledger:
    """Live allocations, running totals and the armed ENOMEM fault."""

    __slots__ = (
        "_fault_countdown",
        "_fault_kind",
        "_serials",
        "allocated",
        "freed",
        "live",
        "live_bytes",
        "page_size",
        "vmalloc_bytes",
    )

    def __init__(self, page_size: int = 4096) -> None:
        self.page_size = page_size
        self.live: dict[int, Allocation] = {}
        self.live_bytes = 0
        self.vmalloc_bytes = 0
        self._serials = itertools.count(1)
        self._fault_countdown = 0
        self._fault_kind: str | None = None
        # Journals of the request in progress (reset by the engine per request).
        self.allocated: list[Allocation] = []
        self.freed: list[Allocation] = []

    def inject_enomem(self, nth: int = 1, kind: str | None = None) -> None:
        """Make the ``nth`` allocation from now (of ``kind`` only, if given) fail, once."""
        if nth < 1:
            raise ValueError("nth must be >= 1")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown allocation kind {kind!r}; kinds: {', '.join(KINDS)}")
        self._fault_countdown = nth
        self._fault_kind = kind

    @property
    def fault_armed(self) -> bool:
        return self._fault_countdown > 0

    def alloc(
        self,
        kind: str,
        as_id: int,
        slot_id: int,
        entries: int,
        entry_size: int,
        allocator: str = VMALLOC,
        level: int = 0,
    ) -> Allocation | None:
        """Allocate, or return ``None`` if the injected fault fires (the kernel's NULL)."""
        if self._fault_countdown and (self._fault_kind is None or self._fault_kind == kind):
            self._fault_countdown -= 1
            if not self._fault_countdown:
                self._fault_kind = None
                return None
        a = Allocation(
            next(self._serials), kind, as_id, slot_id, entries, entry_size, allocator, level,
            self.page_size,
        )
        self.live[a.serial] = a
        self.live_bytes += a.bytes
        self.vmalloc_bytes += a.vmalloc_bytes
        self.allocated.append(a)
        return a

    def free(self, a: Allocation) -> None:
        """Release ``a`` (a double free is a model bug and raises)."""
        del self.live[a.serial]
        self.live_bytes -= a.bytes
        self.vmalloc_bytes -= a.vmalloc_bytes
        self.freed.append(a)

    def begin(self) -> None:
        """Start the journals of a new request."""
        self.allocated = []
        self.freed = []

    def __iter__(self) -> Iterator[Allocation]:
        return iter(list(self.live.values()))

    def __len__(self) -> int:
        return len(self.live)
