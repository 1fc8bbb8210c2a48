"""``GuestMemory``: a VM's guest-physical memory as host mappings registered as memslots, over
any backend of the shared VM API (:class:`~memslot.ModelVM`, :class:`~memslot.KvmVM`).

The region table is an immutable sorted index replaced on every layout change, so lookups
(``bisect``, O(log n)) need no lock and :meth:`GuestMemory.translate_many` vectorizes with
``numpy.searchsorted``. Layout changes are serialised by one lock, and each either completes or
leaves the layout (and the kernel's slots) as they were.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import heapq
import io
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from ..backends.base import VM
from ..backends.kvm import KvmVM
from ..backends.model import KVM_HVA_ERR_BAD, KVM_HVA_ERR_RO_BAD
from ..closing import Closing
from ..constants import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_NR_MEMSLOTS,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    PAGE_SHIFT,
    PAGE_SIZE,
    flag_names,
)
from ..errors import ClosedError, GuestAddressError, KvmError
from .address import GPA_LIMIT, GuestRegion, LayoutError
from .dirty import CONSUMER_USER, DirtyBitmap, DirtySet, DirtyTracker
from .mapping import HostMapping

if TYPE_CHECKING:
    from .snapshot import SnapshotInfo

__all__ = ["GuestMemory"]

CT = TypeVar("CT", bound="ctypes._CData")

_U64 = np.uint64


_U64_MAX = np.uint64((1 << 64) - 1)
#: translate_many: block table of at most this many entries; at most this many region starts
#: per block (else a binary search); gpas processed per pass (temporaries stay in cache).
_TABLE_MAX = 1 << 18
_MAX_ADVANCE = 8
_CHUNK = 1 << 15


class _Lookup:
    """Vectorized gpa -> region lookup for one layout. Arrays are indexed by region + 1 (entry 0
    is an empty dummy region, "below every region"). A block table gives, per ``2**shift``
    bytes from the first region's start, the regions starting at or before the block; a few
    vectorized "advance if the next region starts at or before gpa" steps finish the job, so
    the cost per gpa is a handful of cached gathers instead of a binary search."""

    def __init__(self, regions: list[GuestRegion]) -> None:
        n = len(regions)
        size = n + 2 + _MAX_ADVANCE  # empty sentinels past the end: gpa 2**64-1 may step there
        self.starts = np.full(size, _U64_MAX, dtype=_U64)
        self.starts[0] = 0
        self.starts[1 : n + 1] = [r._gpa for r in regions]
        self.sizes = np.zeros(size, dtype=_U64)
        self.sizes[1 : n + 1] = [r.size for r in regions]
        self.hvas = np.zeros(size, dtype=_U64)
        self.hvas[1 : n + 1] = [r.hva for r in regions]
        self.readonly = np.zeros(size, dtype=bool)
        self.readonly[1 : n + 1] = [r.readonly for r in regions]
        self.table: npt.NDArray[np.intp] | None = None
        self.base = int(self.starts[1]) if n else 0
        self.shift = PAGE_SHIFT
        self.steps = 0
        if n:
            span = int(self.starts[n]) - self.base
            while (span >> self.shift) + 1 > _TABLE_MAX:
                self.shift += 1
            nblocks = (span >> self.shift) + 1
            blocks = (np.arange(nblocks, dtype=_U64) << _U64(self.shift)) + _U64(self.base)
            table = np.searchsorted(self.starts[1 : n + 1], blocks, side="right").astype(np.intp)
            steps = int(np.diff(np.append(table, n)).max())
            if steps <= _MAX_ADVANCE:
                self.table, self.steps = table, steps

    def index(self, g: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
        """Per gpa, 1 + the index of the last region starting at or before it (0: none)."""
        if self.table is None:
            n = self.starts.size - 2 - _MAX_ADVANCE
            found: npt.NDArray[np.intp] = np.searchsorted(self.starts[1 : n + 1], g, side="right")
            return found
        block = g - _U64(self.base)  # below base wraps to a huge block: clipped, then bad
        block >>= _U64(self.shift)
        np.minimum(block, _U64(self.table.size - 1), out=block)
        idx = self.table[block.astype(np.intp)]
        for _ in range(self.steps):
            idx += self.starts[idx + 1] <= g
        return idx

    def translate(self, g: npt.NDArray[np.uint64], write: bool) -> npt.NDArray[np.uint64]:
        idx = self.index(g)
        off = g - self.starts[idx]
        bad = off >= self.sizes[idx]  # the dummy has size 0; gpas below wrap to huge offsets
        out = self.hvas[idx] + off
        if write:
            out[self.readonly[idx] & ~bad] = KVM_HVA_ERR_RO_BAD
        out[bad] = KVM_HVA_ERR_BAD
        return out


_BLOCK = 256  # regions per block of the layout index (split at twice that)


class _Index:
    """An immutable view of the layout: regions in gpa order, kept as blocks so that an update
    copies one block and the short list of blocks (O(sqrt n)), never the whole layout, while
    readers go on using the view they hold. The vectorized lookup is built on first use."""

    __slots__ = ("_blocks", "_firsts", "_keys", "_len", "_lookup")

    def __init__(
        self,
        blocks: tuple[tuple[GuestRegion, ...], ...] = (),
        keys: tuple[tuple[int, ...], ...] | None = None,
    ) -> None:
        self._blocks = blocks
        self._keys = keys if keys is not None else tuple(
            tuple(r._gpa for r in b) for b in blocks)
        self._firsts = [k[0] for k in self._keys]
        self._len = sum(len(b) for b in blocks)
        self._lookup: _Lookup | None = None

    @classmethod
    def of(cls, regions: list[GuestRegion]) -> _Index:
        ordered = sorted(regions, key=lambda r: r._gpa)
        return cls(tuple(tuple(ordered[i : i + _BLOCK])
                         for i in range(0, len(ordered), _BLOCK)))

    def __len__(self) -> int:
        return self._len

    @property
    def regions(self) -> list[GuestRegion]:
        """All regions in gpa order (O(n): for listings, not lookups)."""
        return [r for b in self._blocks for r in b]

    def lookup(self) -> _Lookup:
        if self._lookup is None:
            self._lookup = _Lookup(self.regions)
        return self._lookup

    def _locate(self, gpa: int) -> tuple[int, int]:
        """(block, position) of the last region starting at or below ``gpa``; (-1, -1)."""
        b = bisect.bisect_right(self._firsts, gpa) - 1
        if b < 0:
            return -1, -1
        return b, bisect.bisect_right(self._keys[b], gpa) - 1

    def _from(self, b: int, i: int) -> Iterator[GuestRegion]:
        """Regions from (block b, position i) on, in gpa order."""
        blocks = self._blocks
        while b < len(blocks):
            block = blocks[b]
            while i < len(block):
                yield block[i]
                i += 1
            b, i = b + 1, 0

    def following(self, gpa: int) -> Iterator[GuestRegion]:
        """Regions in gpa order from the one starting at or below ``gpa`` (else the first)."""
        b, i = self._locate(gpa)
        return self._from(b, i) if b >= 0 else self._from(0, 0)

    def find(self, gpa: int) -> GuestRegion | None:
        b, i = self._locate(gpa)
        if b >= 0:
            region = self._blocks[b][i]
            if gpa < region.end:
                return region
        return None

    def neighbours(self, gpa: int) -> tuple[GuestRegion | None, GuestRegion | None]:
        b, i = self._locate(gpa)
        below = self._blocks[b][i] if b >= 0 else None
        after = self._from(b, i + 1) if b >= 0 else self._from(0, 0)
        return below, next(after, None)

    def overlapping(
        self, gpa: int, size: int, skip: GuestRegion | None = None
    ) -> GuestRegion | None:
        b, i = self._locate(gpa)
        for region in self._from(b, i) if b >= 0 else self._from(0, 0):
            if region._gpa >= gpa + size:
                break
            if region is not skip and region.end > gpa:
                return region
        return None

    def inserted(self, region: GuestRegion) -> _Index:
        """A new view with ``region`` added at its gpa."""
        gpa = region._gpa
        blocks, keys = list(self._blocks), list(self._keys)
        if not blocks:
            return _Index(((region,),), ((gpa,),))
        b = max(bisect.bisect_right(self._firsts, gpa) - 1, 0)
        i = bisect.bisect_right(keys[b], gpa)
        block = (*blocks[b][:i], region, *blocks[b][i:])
        key = (*keys[b][:i], gpa, *keys[b][i:])
        if len(block) > 2 * _BLOCK:
            blocks[b : b + 1] = [block[:_BLOCK], block[_BLOCK:]]
            keys[b : b + 1] = [key[:_BLOCK], key[_BLOCK:]]
        else:
            blocks[b], keys[b] = block, key
        return _Index(tuple(blocks), tuple(keys))

    def removed(self, region: GuestRegion, gpa: int) -> _Index:
        """A new view without ``region``, which is filed at ``gpa``."""
        b = bisect.bisect_right(self._firsts, gpa) - 1
        block = self._blocks[b] if b >= 0 else ()
        i = next((k for k, candidate in enumerate(block) if candidate is region), -1)
        if i < 0:
            raise LayoutError(f"{region!r} is not in the layout at {gpa:#x}")
        blocks, keys = list(self._blocks), list(self._keys)
        if len(block) == 1:
            del blocks[b], keys[b]
        else:
            blocks[b] = block[:i] + block[i + 1 :]
            keys[b] = keys[b][:i] + keys[b][i + 1 :]
        return _Index(tuple(blocks), tuple(keys))


class _State:
    """What a GuestMemory must release, apart from it so a finalizer can release it: the
    slots are deleted first, then the mappings unregistered and dropped."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.regions: dict[int, GuestRegion] = {}

    def release(self) -> None:
        vm = self.vm
        for region in list(self.regions.values()):
            if not vm.closed:
                try:
                    vm.set_user_memory_region(region.slot, 0, region._gpa, 0, region.hva)
                except KvmError:  # pragma: no cover - the kernel keeps it; keep the memory too
                    continue
                if isinstance(vm, KvmVM):
                    with contextlib.suppress(ValueError):  # unregistered behind our back
                        vm.unregister_host_mapping(region.hva, region.size)
            region._mapping.close()
        self.regions.clear()


def _describe(region: GuestRegion | None) -> str:
    if region is None:
        return "none"
    label = f" {region.label!r}" if region.label else ""
    return f"[{region._gpa:#x}, {region.end:#x}) slot {region.slot}{label}"


class GuestMemory(Closing):
    """Guest memory of ``vm``. ``manual_protect=True`` enables
    ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` and harvests with GET + CLEAR; otherwise GET resets
    the kernel's log as it reads it (do not enable the capability behind its back).

    Slot ids are allocated lowest-free among ids this object does not use and no slot had
    when it was created; ``KVM_CAP_NR_MEMSLOTS`` bounds them. Use as a context manager or call
    :meth:`close`: every slot is deleted before its memory is unmapped.
    """

    def __init__(self, vm: VM, *, manual_protect: bool = False) -> None:
        if vm.closed:
            raise ClosedError("the VM is closed")
        self._vm = vm
        self._manual_protect = manual_protect
        if manual_protect:
            vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        self._nr_slots = vm.check_extension(KVM_CAP_NR_MEMSLOTS)
        self._lock = threading.RLock()
        self._index = _Index()
        self._foreign = {s.id for s in vm.memslots(0)}
        self._used: set[int] = set()
        self._free: list[int] = []  # heap of released ids below _next_id
        self._next_id = 0
        self._next_uid = 0
        self._closed = False
        self._state = _State(vm)
        self._finalizer = weakref.finalize(self, self._state.release)
        self._consumers: tuple[str, ...] = (CONSUMER_USER,)
        # Snapshot chain state (see snapshot.py).
        self._snap_id: bytes | None = None
        self._snap_seq = 0

    # -- properties -----------------------------------------------------------------------
    @property
    def vm(self) -> VM:
        return self._vm

    @property
    def manual_protect(self) -> bool:
        return self._manual_protect

    @property
    def nr_slots(self) -> int:
        """``KVM_CAP_NR_MEMSLOTS``: the usable slot ids are ``0 .. nr_slots - 1``."""
        return self._nr_slots

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this GuestMemory is closed")

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[GuestRegion]:
        return iter(list(self._index.regions))

    # -- slot ids -------------------------------------------------------------------------
    def _take_id(self, wanted: int | None) -> int:
        if wanted is not None:
            if not 0 <= wanted < self._nr_slots:
                raise LayoutError(f"slot id {wanted} is outside 0..{self._nr_slots - 1}")
            if wanted in self._used or wanted in self._foreign:
                raise LayoutError(f"slot id {wanted} is in use")
            self._used.add(wanted)
            return wanted
        while self._free and (self._free[0] in self._used or self._free[0] in self._foreign):
            heapq.heappop(self._free)
        if self._free:
            slot = heapq.heappop(self._free)
        else:
            while self._next_id in self._used or self._next_id in self._foreign:
                self._next_id += 1
            if self._next_id >= self._nr_slots:
                raise LayoutError(
                    f"no free memslot id: all {self._nr_slots} ids (KVM_CAP_NR_MEMSLOTS) are "
                    f"in use ({len(self._used)} by this GuestMemory)"
                )
            slot = self._next_id
            self._next_id += 1
        self._used.add(slot)
        return slot

    def _release_id(self, slot: int) -> None:
        self._used.discard(slot)
        if slot < self._next_id:
            heapq.heappush(self._free, slot)

    def _refresh_foreign(self) -> None:
        ours = {r.slot for r in self._index.regions}
        self._foreign = {s.id for s in self._vm.memslots(0)} - ours

    # -- layout ---------------------------------------------------------------------------
    def _publish(self, index: _Index) -> None:
        self._index = index

    def _insert(self, region: GuestRegion) -> None:
        self._publish(self._index.inserted(region))

    def _own(self, region: GuestRegion | int) -> GuestRegion:
        if isinstance(region, GuestRegion):
            if self._state.regions.get(region.uid) is not region:
                raise LayoutError(f"{region!r} is not a region of this GuestMemory")
            return region
        found = self._index.find(region)
        if found is None:
            raise LayoutError(f"no region contains gpa {region:#x}")
        return found

    @staticmethod
    def _check_range(gpa: int, size: int) -> None:
        if gpa < 0 or gpa % PAGE_SIZE:
            raise LayoutError(f"gpa {gpa:#x} is not a non-negative multiple of {PAGE_SIZE:#x}")
        if size <= 0 or size % PAGE_SIZE:
            raise LayoutError(f"size {size:#x} must be a positive multiple of {PAGE_SIZE:#x}")
        if gpa + size > GPA_LIMIT:
            raise LayoutError(f"[{gpa:#x}, +{size:#x}) passes 2**64")

    def _check_free(self, gpa: int, size: int, skip: GuestRegion | None = None) -> None:
        other = self._index.overlapping(gpa, size, skip)
        if other is not None:
            raise LayoutError(f"[{gpa:#x}, {gpa + size:#x}) overlaps region {_describe(other)}")

    def add_region(
        self,
        gpa: int,
        size: int,
        *,
        readonly: bool = False,
        log_dirty: bool = False,
        backing: str | os.PathLike[str] = "anon",
        align: int | None = None,
        label: str = "",
        slot: int | None = None,
    ) -> GuestRegion:
        """Map ``size`` bytes (``backing``: ``"anon"``, ``"memfd"`` or a file path; a
        read-only region maps a file privately, so it is never written), register the
        mapping as memslot ``slot`` (lowest free id by default) at ``gpa`` and return the
        region. ``align`` (2 MiB, 1 GiB...) makes ``hva % align == gpa % align``.

        Raises :class:`LayoutError` (overlap, no free id, bad values) or the kernel's
        :class:`KvmError`; either way nothing is left behind."""
        return self._add(gpa, size, readonly=readonly, log_dirty=log_dirty, backing=backing,
                         align=align, label=label, slot=slot)

    def _add(
        self,
        gpa: int,
        size: int,
        *,
        readonly: bool,
        log_dirty: bool,
        backing: str | os.PathLike[str],
        align: int | None,
        label: str,
        slot: int | None,
        uid: int | None = None,
    ) -> GuestRegion:
        self._check_range(gpa, size)
        flags = KVM_MEM_READONLY if readonly else 0
        flags |= KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        with self._lock:
            self._check_open()
            self._check_free(gpa, size)
            private = readonly and backing not in ("anon", "memfd")
            mapping = HostMapping(size, backing=backing, align=align, gpa=gpa,
                                  name=label or f"memslot-{gpa:#x}", private=private)
            vm = self._vm
            registered = False
            slot_id = -1
            try:
                if isinstance(vm, KvmVM):
                    vm.register_host_mapping(mapping.address, size)
                    registered = True
                slot_id = self._take_id(slot)
                slot_id = self._create_slot(slot_id, flags, gpa, size, mapping.address,
                                            retry=slot is None)
            except BaseException:
                if slot_id >= 0:
                    self._release_id(slot_id)
                if registered:
                    assert isinstance(vm, KvmVM)
                    vm.unregister_host_mapping(mapping.address, size)
                mapping.close()
                raise
            if uid is None:
                uid = self._next_uid
            self._next_uid = max(self._next_uid, uid + 1)
            tracker = DirtyTracker(size // PAGE_SIZE, self._consumers)
            region = GuestRegion(uid, slot_id, gpa, flags, mapping, tracker, label)
            self._state.regions[uid] = region
            self._insert(region)
            return region

    def _create_slot(self, slot: int, flags: int, gpa: int, size: int, hva: int,
                     retry: bool) -> int:
        """CREATE; if the id turns out to belong to a slot made behind our back, learn the
        foreign ids and retry with the next free one."""
        while True:
            try:
                self._vm.set_user_memory_region(slot, flags, gpa, size, hva)
                return slot
            except KvmError as exc:
                if not retry or exc.errno not in (errno.EINVAL, errno.EEXIST):
                    raise
                self._refresh_foreign()
                if slot not in self._foreign:
                    raise
                self._used.discard(slot)
                slot = self._take_id(None)

    def remove_region(self, region: GuestRegion | int) -> None:
        """Delete the region's slot, then release its memory (unmapped once no view of it is
        left). ``region`` may be a gpa inside it."""
        with self._lock:
            self._check_open()
            r = self._own(region)
            self._vm.set_user_memory_region(r.slot, 0, r._gpa, 0, r.hva)
            self._publish(self._index.removed(r, r._gpa))
            del self._state.regions[r.uid]
            self._release_id(r.slot)
            if isinstance(self._vm, KvmVM):
                self._vm.unregister_host_mapping(r.hva, r.size)
            r._mapping.close()

    def move_region(self, region: GuestRegion | int, new_gpa: int) -> None:
        """Move the region to ``new_gpa`` (a PCI BAR relocation: a MOVE of its slot; the
        memory, contents and dirty state go with it)."""
        with self._lock:
            self._check_open()
            r = self._own(region)
            self._check_range(new_gpa, r.size)
            if new_gpa == r._gpa:
                return
            self._check_free(new_gpa, r.size, skip=r)
            self._vm.set_user_memory_region(r.slot, r.flags, new_gpa, r.size, r.hva)
            without = self._index.removed(r, r._gpa)
            r._gpa = new_gpa
            self._publish(without.inserted(r))

    def set_dirty_logging(self, region: GuestRegion | int, enabled: bool) -> None:
        """Turn ``KVM_MEM_LOG_DIRTY_PAGES`` on or off (a FLAGS_ONLY change). Pages the kernel
        logged before it is turned off stay pending for the next harvest."""
        with self._lock:
            self._check_open()
            r = self._own(region)
            if r.log_dirty == enabled:
                return
            flags = r.flags ^ KVM_MEM_LOG_DIRTY_PAGES
            with r._dirty.lock:
                if not enabled:
                    r._dirty.collect(self._kernel_log(r))
                self._vm.set_user_memory_region(r.slot, flags, r._gpa, r.size, r.hva)
                self._set_flags(r, flags)

    def set_readonly(self, region: GuestRegion | int, readonly: bool) -> None:
        """Change ``KVM_MEM_READONLY``. The kernel cannot re-flag a slot's READONLY bit, so
        this deletes and re-creates the slot (same id, memory and contents): pause vCPUs
        around it. On failure the old slot is re-created."""
        with self._lock:
            self._check_open()
            r = self._own(region)
            if r.readonly == readonly:
                return
            flags = r.flags ^ KVM_MEM_READONLY
            vm = self._vm
            with r._dirty.lock:
                r._dirty.collect(self._kernel_log(r))
                vm.set_user_memory_region(r.slot, 0, r._gpa, 0, r.hva)
                try:
                    vm.set_user_memory_region(r.slot, flags, r._gpa, r.size, r.hva)
                except BaseException:
                    vm.set_user_memory_region(r.slot, r.flags, r._gpa, r.size, r.hva)
                    raise
                self._set_flags(r, flags)

    @staticmethod
    def _set_flags(r: GuestRegion, flags: int) -> None:
        r.flags = flags
        if not flags & (KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY):
            r._untracked = True

    def set_label(self, region: GuestRegion | int, label: str) -> None:
        with self._lock:
            self._own(region)._label = label

    def regions(self) -> list[GuestRegion]:
        """The regions in gpa order."""
        return list(self._index.regions)

    def find_region(self, gpa: int) -> GuestRegion | None:
        """The region containing ``gpa``, if any."""
        return self._index.find(gpa)

    def region_by_label(self, label: str) -> GuestRegion:
        for r in self._index.regions:
            if r.label == label:
                return r
        raise LayoutError(f"no region is labelled {label!r}")

    def format_layout(self) -> str:
        """The layout as a text table."""
        headers = ["slot", "gpa", "end", "size", "hva", "flags", "backing", "label"]
        rows = [
            [str(r.slot), f"{r._gpa:#x}", f"{r.end:#x}", _size(r.size), f"{r.hva:#x}",
             flag_names(r.flags), r.backing, r.label]
            for r in self._index.regions
        ]
        widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
        out = io.StringIO()
        for row in [headers, *rows]:
            out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
            out.write("\n")
        return out.getvalue()

    def print_layout(self) -> None:
        print(self.format_layout(), end="")

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self)} regions"
        return f"<GuestMemory {state} on {self._vm!r}>"

    # -- access ---------------------------------------------------------------------------
    def _unmapped(self, index: _Index, gpa: int, length: int, bad: int) -> GuestAddressError:
        below, above = index.neighbours(bad)
        if below is not None and below.contains(bad):  # pragma: no cover - defensive
            below = None
        exc = GuestAddressError(
            f"gpa {bad:#x} is not backed by any region (access [{gpa:#x}, {gpa + length:#x})); "
            f"nearest below: {_describe(below)}; above: {_describe(above)}"
        )
        exc.gpa = bad  # type: ignore[attr-defined]
        return exc

    def _pieces(self, gpa: int, length: int) -> list[tuple[GuestRegion, int, int]]:
        """Split ``[gpa, gpa + length)`` over adjacent regions: ``(region, offset, n)``.
        Raises :class:`GuestAddressError` naming the first unbacked gpa."""
        index = self._index
        if gpa < 0 or length < 0 or gpa + length > GPA_LIMIT:
            raise GuestAddressError(f"access [{gpa:#x}, +{length:#x}) is outside [0, 2**64)")
        out: list[tuple[GuestRegion, int, int]] = []
        pos, end = gpa, gpa + length
        following = index.following(gpa)
        while pos < end:
            region = next(following, None)
            if region is None or not region._gpa <= pos < region.end:
                raise self._unmapped(index, gpa, length, pos)
            n = min(end, region.end) - pos
            out.append((region, pos - region._gpa, n))
            pos += n
        return out

    def _one(self, gpa: int, length: int, what: str) -> tuple[GuestRegion, int]:
        pieces = self._pieces(gpa, length)
        if len(pieces) != 1:
            if not pieces:  # length 0
                region = self._index.find(gpa)
                if region is None:
                    raise self._unmapped(self._index, gpa, 0, gpa)
                return region, gpa - region._gpa
            raise GuestAddressError(
                f"{what} [{gpa:#x}, {gpa + length:#x}) spans {len(pieces)} regions; "
                "a zero-copy view lies within one region (use read())"
            )
        return pieces[0][0], pieces[0][1]

    @staticmethod
    def _buffer(region: GuestRegion) -> memoryview:
        try:
            return region._mapping.buffer
        except LayoutError:
            raise GuestAddressError(f"{region!r} was removed during the access") from None

    def read(self, gpa: int, length: int) -> bytes:
        """``length`` bytes from ``gpa`` (may span adjacent regions)."""
        pieces = self._pieces(gpa, length)
        if len(pieces) == 1:
            region, off, n = pieces[0]
            return bytes(self._buffer(region)[off : off + n])
        return b"".join(bytes(self._buffer(r)[off : off + n]) for r, off, n in pieces)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``gpa`` (may span adjacent regions; read-only regions too: that
        flag binds the guest, not the VMM). The whole range is checked first: an unbacked
        byte raises :class:`GuestAddressError` and nothing is written. Marks the pages dirty
        in the host bitmap."""
        src = memoryview(data)
        if not src.c_contiguous:
            src = memoryview(src.tobytes())
        src = src.cast("B")
        pieces = self._pieces(gpa, len(src))
        pos = 0
        for region, off, n in pieces:
            buf = self._buffer(region)
            tracker = region._dirty
            first = off >> PAGE_SHIFT
            with tracker.lock:
                buf[off : off + n] = src[pos : pos + n]
                tracker.mark_range(first, ((off + n - 1) >> PAGE_SHIFT) - first + 1)
            pos += n

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        """Set ``length`` bytes at ``gpa`` to ``byte`` (checked first, like :meth:`write`)."""
        pieces = self._pieces(gpa, length)
        for region, off, n in pieces:
            arr = np.frombuffer(self._buffer(region), dtype=np.uint8, count=n, offset=off)
            tracker = region._dirty
            first = off >> PAGE_SHIFT
            with tracker.lock:
                arr[:] = byte
                tracker.mark_range(first, ((off + n - 1) >> PAGE_SHIFT) - first + 1)

    def view(self, gpa: int, length: int, *, writable: bool = False) -> memoryview:
        """A zero-copy view of ``[gpa, gpa + length)`` within one region (read-only unless
        ``writable``). A writable view marks its pages dirty when it is made; writes through a
        view kept across a harvest must be reported with :meth:`mark_dirty`. The view keeps the
        memory mapped even after the region is removed."""
        region, off = self._one(gpa, length, "view")
        view = self._buffer(region)[off : off + length]
        if writable:
            self._mark(region, off, length)
            return view
        return view.toreadonly()

    def numpy(
        self,
        gpa: int,
        count: int,
        dtype: npt.DTypeLike = np.uint8,
        *,
        writable: bool = False,
    ) -> npt.NDArray[Any]:
        """A zero-copy numpy array of ``count`` items of ``dtype`` at ``gpa`` (one region;
        read-only unless ``writable``, same dirty rules as :meth:`view`)."""
        dt = np.dtype(dtype)
        region, off = self._one(gpa, count * dt.itemsize, "numpy view")
        arr = np.frombuffer(self._buffer(region), dtype=dt, count=count, offset=off)
        if writable:
            self._mark(region, off, count * dt.itemsize)
        else:
            arr.flags.writeable = False
        return arr

    def read_obj(self, gpa: int, ctype: type[CT]) -> CT:
        """A copy of the ctypes object (``c_uint32``, a ``Structure``...) stored at ``gpa``."""
        size = ctypes.sizeof(ctype)
        pieces = self._pieces(gpa, size)
        if len(pieces) == 1:
            region, off, _ = pieces[0]
            obj: CT = ctype.from_buffer_copy(self._buffer(region), off)  # type: ignore[attr-defined]
            return obj
        copy: CT = ctype.from_buffer_copy(self.read(gpa, size))  # type: ignore[attr-defined]
        return copy

    def write_obj(self, gpa: int, obj: ctypes._CData) -> None:
        """Store the bytes of a ctypes object at ``gpa``."""
        self.write(gpa, memoryview(obj).cast("B"))

    def _mark(self, region: GuestRegion, off: int, length: int) -> None:
        if length <= 0:
            return
        first = off >> PAGE_SHIFT
        with region._dirty.lock:
            region._dirty.mark_range(first, ((off + length - 1) >> PAGE_SHIFT) - first + 1)

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Record host writes made outside :meth:`write` (through a view, another process's
        memfd mapping, DMA...) in the host bitmap."""
        for region, off, n in self._pieces(gpa, length):
            self._mark(region, off, n)

    # -- translation ----------------------------------------------------------------------
    def translate(self, gpa: int) -> int:
        """The host virtual address of ``gpa``; :class:`GuestAddressError` if unbacked."""
        index = self._index
        region = index.find(gpa)
        if region is None:
            raise self._unmapped(index, gpa, 1, gpa)
        return region.hva + (gpa - region._gpa)

    def translate_many(
        self, gpas: npt.ArrayLike, *, write: bool = False
    ) -> npt.NDArray[np.uint64]:
        """Vectorized :meth:`translate`: an array of hvas, with ``KVM_HVA_ERR_BAD`` where a
        gpa is unbacked (and, with ``write=True``, ``KVM_HVA_ERR_RO_BAD`` in read-only
        regions), as KVM's ``__gfn_to_hva_many`` does. Test with ``hvas >= KVM_HVA_ERR_BAD``
        (``memslot.kvm_is_error_hva``)."""
        g = np.asarray(gpas)
        if g.dtype.kind not in "iu":
            raise TypeError(f"gpas must be an integer array, not {g.dtype}")
        flat = g.reshape(-1)
        gu = flat.astype(_U64, copy=False)
        lookup = self._index.lookup()
        out = np.empty(gu.shape, dtype=_U64)
        for start in range(0, gu.size, _CHUNK):
            part = slice(start, start + _CHUNK)
            out[part] = lookup.translate(gu[part], write)
        if flat.dtype.kind == "i":
            out[flat < 0] = KVM_HVA_ERR_BAD
        return out.reshape(g.shape)

    # -- dirty tracking -------------------------------------------------------------------
    def _kernel_log(self, region: GuestRegion) -> npt.NDArray[np.uint64] | None:
        """The kernel's log of ``region``, reset in the kernel (caller holds the region's
        lock); ``None`` when the slot does not log."""
        if not region.log_dirty:
            return None
        raw = self._vm.get_dirty_log(region.slot)
        words: npt.NDArray[np.uint64] = np.frombuffer(raw, dtype="<u8").astype(_U64, copy=False)
        if self._manual_protect and words.any():
            self._vm.clear_dirty_log(region.slot, 0, region.npages, raw)
        return words

    def _harvest(self, region: GuestRegion, consumer: str) -> DirtyBitmap:
        with region._dirty.lock:
            region._dirty.collect(self._kernel_log(region))
            words = region._dirty.take(consumer)
        return DirtyBitmap(region._gpa, region.npages, words, region.slot, region.label)

    def _add_consumer(self, name: str) -> None:
        if name not in self._consumers:
            self._consumers = (*self._consumers, name)
            for r in self._index.regions:
                with r._dirty.lock:
                    r._dirty.add_consumer(name)

    def harvest_dirty(self, region: GuestRegion | int | None = None) -> DirtySet:
        """Harvest and reset the dirty pages of ``region`` (or of every region): the kernel's
        log plus the host bitmap, atomically per region. Pages written during the harvest are
        in this result or in the next one, never lost."""
        with self._lock:
            self._check_open()
            targets = self._index.regions if region is None else [self._own(region)]
            return DirtySet(self._harvest(r, CONSUMER_USER) for r in targets)

    def dirty_pages(self, region: GuestRegion | int | None = None) -> npt.NDArray[np.uint64]:
        """Harvest (see :meth:`harvest_dirty`) and return the dirty pages' gpas, ascending."""
        return self.harvest_dirty(region).pages()

    def dirty_ranges(self, region: GuestRegion | int | None = None) -> list[tuple[int, int]]:
        """Harvest (see :meth:`harvest_dirty`) and return dirty ``(gpa, length)`` runs."""
        return self.harvest_dirty(region).ranges()

    # -- snapshots ------------------------------------------------------------------------
    def snapshot(self, path: str | os.PathLike[str], *, incremental: bool = False) -> SnapshotInfo:
        """Write the layout and memory to ``path``; with ``incremental=True`` only the pages
        dirtied since the previous snapshot (the file chains to it). See
        docs/snapshot-format.md."""
        from .snapshot import write_snapshot

        return write_snapshot(self, path, incremental=incremental)

    @classmethod
    def restore(
        cls,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        vm: VM,
        *,
        manual_protect: bool = False,
    ) -> GuestMemory:
        """Rebuild regions and contents on ``vm`` from a full snapshot followed by its chain
        of incremental ones. Every file is verified before anything is created; on any error
        nothing is left on ``vm``. The result can continue the chain."""
        from .snapshot import restore_snapshot

        if isinstance(paths, str | os.PathLike):
            paths = [paths]
        return restore_snapshot(cls, list(paths), vm, manual_protect=manual_protect)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Delete every slot, then release the memory (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._finalizer()
            self._publish(_Index())


def _size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n:#x}"
