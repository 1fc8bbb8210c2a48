"""Guest memory for Python VMMs (after rust-vmm's vm-memory), over any memslot backend:
mmap-backed regions registered as memslots, gpa access and translation, dirty tracking that
combines the kernel's log with host writes, and incremental snapshots.

>>> import memslot
>>> from memslot.guest import GuestMemory
>>> with memslot.ModelVM() as vm, GuestMemory(vm) as mem:
...     ram = mem.add_region(0, 1 << 20, log_dirty=True, label="ram")
...     mem.write(0x1000, b"hello")
...     mem.read(0x1000, 5), [hex(g) for g in mem.dirty_pages()]
(b'hello', ['0x1000'])
"""

from __future__ import annotations

from .address import GuestAddress, GuestRegion, LayoutError
from .dirty import DirtyBitmap, DirtySet
from .mapping import HostMapping
from .memory import GuestMemory
from .snapshot import (
    FORMAT_VERSION,
    RegionRecord,
    SnapshotError,
    SnapshotInfo,
    read_info,
    verify_chain,
)

__all__ = [
    "FORMAT_VERSION",
    "DirtyBitmap",
    "DirtySet",
    "GuestAddress",
    "GuestMemory",
    "GuestRegion",
    "HostMapping",
    "LayoutError",
    "RegionRecord",
    "SnapshotError",
    "SnapshotInfo",
    "read_info",
    "verify_chain",
]
