"""``GuestMemory``: a VM's guest-physical memory as host mappings registered as memslots, over
any backend of the shared VM API (:class:`~memslot.ModelVM`, :class:`~memslot.KvmVM`).

The layout is an immutable index (index.py) replaced on every change, so accesses need no
lock and see one layout from start to end; slot ids come from slot_ids.py. Layout changes are
serialised by one lock, and each either completes or leaves the layout (and the kernel's slots)
as they were. Snapshots (snapshot.py) see GuestMemory only through :class:`SnapshotAccess`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from ..backends.base import KVM_HVA_ERR_BAD, KVM_HVA_ERR_RO_BAD, VM
from ..closing import Closing
from ..constants import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_NR_MEMSLOTS,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    PAGE_SIZE,
    flag_names,
)
from ..errors import ClosedError, GuestAddressError, KvmError
from ..units import human_bytes
from .address import GPA_LIMIT, GuestRegion, LayoutError
from .dirty import CONSUMER_SNAPSHOT, CONSUMER_USER, DirtyBitmap, DirtySet, DirtyTracker
from .index import LayoutIndex, Placed
from .mapping import HostMapping
from .slot_ids import SlotIds

if TYPE_CHECKING:
    from .snapshot import SnapshotInfo

__all__ = ["GuestMemory", "SnapshotAccess"]

CT = TypeVar("CT", bound="ctypes._CData")

_U64 = np.uint64
#: translate_many: gpas processed per pass (temporaries stay in cache).
_CHUNK = 1 << 15


def _unregister(vm: VM, addr: int, size: int) -> None:
    with contextlib.suppress(ValueError):  # unregistered behind our back
        vm.unregister_host_mapping(addr, size)


def _user_addr_limit(vm: VM) -> int | None:
    """Where the VM's user address space ends, when it says (a model's profile): host
    mappings are placed below it, since a 64-bit host maps near 2^47 and ppc64 stops at 2^46."""
    limit = getattr(getattr(vm, "profile", None), "user_addr_limit", None)
    return limit if isinstance(limit, int) and limit > 0 else None


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
                _unregister(vm, region.hva, region.size)
            region._mapping.close()
        self.regions.clear()


def _describe(placed: Placed | None) -> str:
    if placed is None:
        return "none"
    region = placed.region
    label = f" {region.label!r}" if region.label else ""
    return f"[{placed.start:#x}, {placed.end:#x}) slot {region.slot}{label}"


class GuestMemory(Closing):
    """Guest memory of ``vm``. ``manual_protect=True`` enables
    ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` and harvests with GET + CLEAR; otherwise GET resets
    the kernel's log as it reads it (do not enable the capability behind its back).

    Slot ids are allocated lowest-free among ids this object does not use and no slot had
    when it was created; ``KVM_CAP_NR_MEMSLOTS`` bounds them. Use as a context manager or call
    :meth:`close`: every slot is deleted before its memory is unmapped. Sizes, gpas and dirty
    bitmaps are in the VM's page size (64 KiB on the ``ppc64-*`` profiles).
    """

    def __init__(self, vm: VM, *, manual_protect: bool = False) -> None:
        if vm.closed:
            raise ClosedError("the VM is closed")
        self._vm = vm
        self._manual_protect = manual_protect
        self._page_size = vm.page_size
        self._page_shift = self._page_size.bit_length() - 1
        self._addr_limit = _user_addr_limit(vm)
        if manual_protect:
            vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        self._lock = threading.RLock()
        self._index = LayoutIndex(self._page_shift)
        self._ids = SlotIds(vm.check_extension(KVM_CAP_NR_MEMSLOTS),
                            {s.id for s in vm.memslots(0)})
        self._next_uid = 0
        self._closed = False
        self._state = _State(vm)
        self._finalizer = weakref.finalize(self, self._state.release)
        self._consumers: tuple[str, ...] = (CONSUMER_USER,)
        self._chain = ChainState()

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
        return self._ids.limit

    @property
    def page_size(self) -> int:
        """The VM's page size."""
        return self._page_size

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this GuestMemory is closed")

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[GuestRegion]:
        return iter(self.regions())

    # -- layout ---------------------------------------------------------------------------
    def _own(self, region: GuestRegion | int) -> Placed:
        """Where ``region`` (or the region containing a gpa) sits now (caller holds the
        lock)."""
        index = self._index
        if isinstance(region, GuestRegion):
            if self._state.regions.get(region.uid) is not region:
                raise LayoutError(f"{region!r} is not a region of this GuestMemory")
            placed = index.find(region._gpa)
            assert placed is not None and placed.region is region
            return placed
        found = index.find(region)
        if found is None:
            raise LayoutError(f"no region contains gpa {region:#x}")
        return found

    def _check_range(self, gpa: int, size: int) -> None:
        page = self._page_size
        if gpa < 0 or gpa % page:
            raise LayoutError(f"gpa {gpa:#x} is not a non-negative multiple of {page:#x}")
        if size <= 0 or size % page:
            raise LayoutError(f"size {size:#x} must be a positive multiple of {page:#x}")
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
                         align=align, label=label, slot=slot).region

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
    ) -> Placed:
        self._check_range(gpa, size)
        flags = KVM_MEM_READONLY if readonly else 0
        flags |= KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        if self._page_size > PAGE_SIZE:  # the kernel wants userspace_addr page aligned
            align = max(align or 0, self._page_size)
        with self._lock:
            self._check_open()
            self._check_free(gpa, size)
            private = readonly and backing not in ("anon", "memfd")
            mapping = HostMapping(size, backing=backing, align=align, gpa=gpa,
                                  name=label or f"memslot-{gpa:#x}", private=private,
                                  below=self._addr_limit)
            vm = self._vm
            registered = False
            slot_id = -1
            try:
                vm.register_host_mapping(mapping.address, size)
                registered = True
                slot_id = self._ids.take(slot)
                slot_id = self._create_slot(slot_id, flags, gpa, size, mapping.address,
                                            retry=slot is None)
            except BaseException:
                if slot_id >= 0:
                    self._ids.release(slot_id)
                if registered:
                    _unregister(vm, mapping.address, size)
                mapping.close()
                raise
            if uid is None:
                uid = self._next_uid
            self._next_uid = max(self._next_uid, uid + 1)
            tracker = DirtyTracker(size >> self._page_shift, self._consumers, self._page_shift)
            region = GuestRegion(uid, slot_id, gpa, flags, mapping, tracker, label,
                                 self._page_size)
            self._state.regions[uid] = region
            placed = Placed(region, gpa, flags, mapping.buffer, tracker)
            self._index = self._index.inserted(placed)
            return placed

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
                ours = {r.slot for r in self._state.regions.values()}
                self._ids.set_foreign({s.id for s in self._vm.memslots(0)} - ours)
                if slot not in self._ids.foreign:
                    raise
                self._ids.forget(slot)
                slot = self._ids.take(None)

    def remove_region(self, region: GuestRegion | int) -> None:
        """Delete the region's slot, then release its memory (unmapped once no view of it is
        left). ``region`` may be a gpa inside it."""
        with self._lock:
            self._check_open()
            placed = self._own(region)
            r = placed.region
            self._vm.set_user_memory_region(r.slot, 0, placed.start, 0, r.hva)
            self._index = self._index.removed(placed)
            del self._state.regions[r.uid]
            self._ids.release(r.slot)
            _unregister(self._vm, r.hva, r.size)
            r._mapping.close()

    def _replace(self, old: Placed, start: int, flags: int) -> None:
        """Publish ``old``'s region at ``start`` with ``flags`` (caller holds the lock)."""
        new = Placed(old.region, start, flags, old.buf, old.tracker)
        self._index = self._index.replaced(old, new)
        old.region._gpa = start
        old.region.flags = flags
        if not flags & (KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY):
            old.region._untracked = True

    def move_region(self, region: GuestRegion | int, new_gpa: int) -> None:
        """Move the region to ``new_gpa`` (a PCI BAR relocation: a MOVE of its slot; the
        memory, contents and dirty state go with it). Concurrent accesses see the region at
        its old gpa or at the new one, never a mix."""
        with self._lock:
            self._check_open()
            placed = self._own(region)
            r = placed.region
            self._check_range(new_gpa, r.size)
            if new_gpa == placed.start:
                return
            self._check_free(new_gpa, r.size, skip=r)
            self._vm.set_user_memory_region(r.slot, placed.flags, new_gpa, r.size, r.hva)
            self._replace(placed, new_gpa, placed.flags)

    def set_dirty_logging(self, region: GuestRegion | int, enabled: bool) -> None:
        """Turn ``KVM_MEM_LOG_DIRTY_PAGES`` on or off (a FLAGS_ONLY change). Pages the kernel
        logged before it is turned off stay pending for the next harvest."""
        with self._lock:
            self._check_open()
            placed = self._own(region)
            r = placed.region
            if r.log_dirty == enabled:
                return
            flags = r.flags ^ KVM_MEM_LOG_DIRTY_PAGES
            with r._dirty.lock:
                if not enabled:
                    r._dirty.collect(self._kernel_log(placed))
                self._vm.set_user_memory_region(r.slot, flags, placed.start, r.size, r.hva)
                self._replace(placed, placed.start, flags)

    def set_readonly(self, region: GuestRegion | int, readonly: bool) -> None:
        """Change ``KVM_MEM_READONLY``. The kernel cannot re-flag a slot's READONLY bit, so
        this deletes and re-creates the slot (same id, memory and contents): pause vCPUs
        around it. On failure the old slot is re-created."""
        with self._lock:
            self._check_open()
            placed = self._own(region)
            r = placed.region
            if r.readonly == readonly:
                return
            flags = r.flags ^ KVM_MEM_READONLY
            vm = self._vm
            gpa = placed.start
            with r._dirty.lock:
                r._dirty.collect(self._kernel_log(placed))
                vm.set_user_memory_region(r.slot, 0, gpa, 0, r.hva)
                try:
                    vm.set_user_memory_region(r.slot, flags, gpa, r.size, r.hva)
                except BaseException:
                    vm.set_user_memory_region(r.slot, r.flags, gpa, r.size, r.hva)
                    raise
                self._replace(placed, gpa, flags)

    def set_label(self, region: GuestRegion | int, label: str) -> None:
        with self._lock:
            self._own(region).region._label = label

    def regions(self) -> list[GuestRegion]:
        """The regions in gpa order."""
        return [p.region for p in self._index.placed()]

    def find_region(self, gpa: int) -> GuestRegion | None:
        """The region containing ``gpa``, if any."""
        placed = self._index.find(gpa)
        return None if placed is None else placed.region

    def region_by_label(self, label: str) -> GuestRegion:
        for r in self.regions():
            if r.label == label:
                return r
        raise LayoutError(f"no region is labelled {label!r}")

    def format_layout(self) -> str:
        """The layout as a text table."""
        headers = ["slot", "gpa", "end", "size", "hva", "flags", "backing", "label"]
        rows = [
            [str(r.slot), f"{p.start:#x}", f"{p.end:#x}", human_bytes(p.size, exact=True),
             f"{r.hva:#x}", flag_names(p.flags), r.backing, r.label]
            for p in self._index.placed()
            for r in (p.region,)
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
    # Every access reads the published index once and uses only what it holds. The common
    # case (the whole range inside the region of the latest lookup) is inlined.
    def _unmapped(self, index: LayoutIndex, gpa: int, length: int,
                  bad: int) -> GuestAddressError:
        below, above = index.neighbours(bad)
        if below is not None and below.start <= bad < below.end:  # pragma: no cover
            below = None
        exc = GuestAddressError(
            f"gpa {bad:#x} is not backed by any region (access [{gpa:#x}, {gpa + length:#x})); "
            f"nearest below: {_describe(below)}; above: {_describe(above)}"
        )
        exc.gpa = bad  # type: ignore[attr-defined]
        return exc

    def _pieces(self, gpa: int, length: int) -> list[tuple[Placed, int, int]]:
        """Split ``[gpa, gpa + length)`` over adjacent regions of one layout:
        ``(placed, offset, n)``. Raises :class:`GuestAddressError` naming the first unbacked
        gpa."""
        index = self._index
        if gpa < 0 or length < 0 or gpa + length > GPA_LIMIT:
            raise GuestAddressError(f"access [{gpa:#x}, +{length:#x}) is outside [0, 2**64)")
        out: list[tuple[Placed, int, int]] = []
        pos, end = gpa, gpa + length
        following = index.following(gpa)
        while pos < end:
            placed = next(following, None)
            if placed is None or not placed.start <= pos < placed.end:
                raise self._unmapped(index, gpa, length, pos)
            n = min(end, placed.end) - pos
            out.append((placed, pos - placed.start, n))
            pos += n
        if out:
            index.last = out[-1][0]
        return out

    def _one(self, gpa: int, length: int, what: str) -> tuple[Placed, int]:
        index = self._index
        p = index.last
        if p is not None and gpa - p.start >= 0 and 0 < length <= p.end - gpa:
            return p, gpa - p.start
        pieces = self._pieces(gpa, length)
        if len(pieces) != 1:
            if not pieces:  # length 0
                found = index.find(gpa)
                if found is None:
                    raise self._unmapped(index, gpa, 0, gpa)
                return found, gpa - found.start
            raise GuestAddressError(
                f"{what} [{gpa:#x}, {gpa + length:#x}) spans {len(pieces)} regions; "
                "a zero-copy view lies within one region (use read())"
            )
        return pieces[0][0], pieces[0][1]

    def read(self, gpa: int, length: int) -> bytes:
        """``length`` bytes from ``gpa`` (may span adjacent regions)."""
        p = self._index.last
        if p is not None:
            off = gpa - p.start
            end = off + length
            if 0 <= off <= end <= p.size:
                return p.buf[off:end].tobytes()
        pieces = self._pieces(gpa, length)
        return b"".join(p.buf[off : off + n].tobytes() for p, off, n in pieces)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``gpa`` (may span adjacent regions; read-only regions too: that
        flag binds the guest, not the VMM). The whole range is checked first: an unbacked
        byte raises :class:`GuestAddressError` and nothing is written. Marks the pages dirty
        in the host bitmap."""
        p = self._index.last
        try:  # the common case: plain bytes inside the region of the latest lookup
            off = gpa - p.start  # type: ignore[union-attr]
            end = off + len(data)
            if 0 <= off < end <= p.size:  # type: ignore[union-attr]
                # Data first, then the bit. The lock is skipped when the page's bit is still
                # pending (``hot``: the page marked last; or its bit in ``host``). Both are
                # read after the data was written and replaced by the harvest that takes the
                # bit, so that harvest reads the memory after this write.
                p.buf[off:end] = data  # type: ignore[union-attr]
                t = p.tracker  # type: ignore[union-attr]
                s = t.shift
                first = off >> s
                last = (end - 1) >> s
                if first == last and (first == t.hot
                                      or t.host[first >> 3] >> (first & 7) & 1):
                    return
                with t.lock:
                    t.mark_range(first, last - first + 1)
                return
        except (AttributeError, TypeError, ValueError):  # no region yet, not plain bytes
            pass
        src = memoryview(data)
        if not src.c_contiguous:
            src = memoryview(src.tobytes())
        src = src.cast("B")
        pos = 0
        for placed, off, n in self._pieces(gpa, len(src)):
            tracker = placed.tracker
            first = off >> tracker.shift
            with tracker.lock:
                placed.buf[off : off + n] = src[pos : pos + n]
                tracker.mark_range(first, ((off + n - 1) >> tracker.shift) - first + 1)
            pos += n

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        """Set ``length`` bytes at ``gpa`` to ``byte`` (checked first, like :meth:`write`)."""
        for placed, off, n in self._pieces(gpa, length):
            arr = np.frombuffer(placed.buf, dtype=np.uint8, count=n, offset=off)
            tracker = placed.tracker
            first = off >> tracker.shift
            with tracker.lock:
                arr[:] = byte
                tracker.mark_range(first, ((off + n - 1) >> tracker.shift) - first + 1)

    def view(self, gpa: int, length: int, *, writable: bool = False) -> memoryview:
        """A zero-copy view of ``[gpa, gpa + length)`` within one region (read-only unless
        ``writable``). A writable view marks its pages dirty when it is made; writes through a
        view kept across a harvest must be reported with :meth:`mark_dirty`. The view keeps the
        memory mapped even after the region is removed."""
        placed, off = self._one(gpa, length, "view")
        view = placed.buf[off : off + length]
        if writable:
            _mark(placed, off, length)
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
        placed, off = self._one(gpa, count * dt.itemsize, "numpy view")
        arr = np.frombuffer(placed.buf, dtype=dt, count=count, offset=off)
        if writable:
            _mark(placed, off, count * dt.itemsize)
        else:
            arr.flags.writeable = False
        return arr

    def read_obj(self, gpa: int, ctype: type[CT]) -> CT:
        """A copy of the ctypes object (``c_uint32``, a ``Structure``...) stored at ``gpa``."""
        size = ctypes.sizeof(ctype)
        pieces = self._pieces(gpa, size)
        if len(pieces) == 1:
            placed, off, _ = pieces[0]
            obj: CT = ctype.from_buffer_copy(placed.buf, off)  # type: ignore[attr-defined]
            return obj
        data = b"".join(p.buf[off : off + n].tobytes() for p, off, n in pieces)
        copy: CT = ctype.from_buffer_copy(data)  # type: ignore[attr-defined]
        return copy

    def write_obj(self, gpa: int, obj: ctypes._CData) -> None:
        """Store the bytes of a ctypes object at ``gpa``."""
        self.write(gpa, memoryview(obj).cast("B"))

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Record host writes made outside :meth:`write` (through a view, another process's
        memfd mapping, DMA...) in the host bitmap."""
        for placed, off, n in self._pieces(gpa, length):
            _mark(placed, off, n)

    # -- translation ----------------------------------------------------------------------
    def translate(self, gpa: int) -> int:
        """The host virtual address of ``gpa``; :class:`GuestAddressError` if unbacked."""
        index = self._index
        p = index.last
        if p is None or not p.start <= gpa < p.end:
            p = index.find(gpa)
            if p is None:
                raise self._unmapped(index, gpa, 1, gpa)
        return p.hva + (gpa - p.start)

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
        lookup = self._index.lookup(KVM_HVA_ERR_BAD, KVM_HVA_ERR_RO_BAD)
        out = np.empty(gu.shape, dtype=_U64)
        for start in range(0, gu.size, _CHUNK):
            part = slice(start, start + _CHUNK)
            out[part] = lookup.translate(gu[part], write)
        if flat.dtype.kind == "i":
            out[flat < 0] = KVM_HVA_ERR_BAD
        return out.reshape(g.shape)

    # -- dirty tracking -------------------------------------------------------------------
    def _kernel_log(self, placed: Placed) -> npt.NDArray[np.uint64] | None:
        """The kernel's log of the region, reset in the kernel (caller holds the region's
        lock); ``None`` when the slot does not log."""
        region = placed.region
        if not placed.flags & KVM_MEM_LOG_DIRTY_PAGES:
            return None
        raw = self._vm.get_dirty_log(region.slot)
        words: npt.NDArray[np.uint64] = np.frombuffer(raw, dtype="<u8").astype(_U64, copy=False)
        if self._manual_protect and words.any():
            self._vm.clear_dirty_log(region.slot, 0, region.npages, raw)
        return words

    def _harvest(self, placed: Placed, consumer: str) -> DirtyBitmap:
        tracker = placed.tracker
        with tracker.lock:
            tracker.collect(self._kernel_log(placed))
            words = tracker.take(consumer)
        region = placed.region
        return DirtyBitmap(placed.start, region.npages, words, region.slot, region.label,
                           self._page_shift)

    def _add_consumer(self, name: str) -> None:
        if name not in self._consumers:
            self._consumers = (*self._consumers, name)
            for p in self._index.placed():
                with p.tracker.lock:
                    p.tracker.add_consumer(name)

    def harvest_dirty(self, region: GuestRegion | int | None = None) -> DirtySet:
        """Harvest and reset the dirty pages of ``region`` (or of every region): the kernel's
        log plus the host bitmap, atomically per region. Pages written during the harvest are
        in this result or in the next one, never lost."""
        with self._lock:
            self._check_open()
            targets = self._index.placed() if region is None else [self._own(region)]
            return DirtySet(self._harvest(p, CONSUMER_USER) for p in targets)

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

        return write_snapshot(SnapshotAccess(self), path, incremental=incremental)

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
        gm = cls(vm, manual_protect=manual_protect)
        try:
            restore_snapshot(SnapshotAccess(gm), list(paths))
        except BaseException:
            gm.close()
            raise
        return gm

    def export_elf(self, path: str | os.PathLike[str], *, machine: int | None = None) -> None:
        """Write the guest's memory as an ELF64 core file (one ``PT_LOAD`` per region,
        ``p_paddr`` = its gpa), the format QEMU's ``dump-guest-memory`` writes and Volatility,
        crash or drgn read. ``machine`` is ``e_machine`` (default: the VM's arch). Zero pages
        are left as holes of a sparse file."""
        from .elfcore import machine_of, write_elf_core

        with self._lock:
            self._check_open()
            write_elf_core(path, [(p.start, p.buf) for p in self._index.placed()],
                           machine_of(self._vm) if machine is None else machine)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Delete every slot, then release the memory (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._finalizer()
            self._index = LayoutIndex(self._page_shift)


def _mark(placed: Placed, off: int, length: int) -> None:
    if length <= 0:
        return
    tracker = placed.tracker
    first = off >> tracker.shift
    with tracker.lock:
        tracker.mark_range(first, ((off + length - 1) >> tracker.shift) - first + 1)


class ChainState:
    """Id and sequence of the latest snapshot written or restored (``None``: none yet)."""

    __slots__ = ("id", "seq")

    def __init__(self) -> None:
        self.id: bytes | None = None
        self.seq = 0


class SnapshotAccess:
    """The narrow interface snapshots (snapshot.py) have to a :class:`GuestMemory`: its
    layout as one consistent list, harvesting for the snapshot consumer, the chain state, and
    building regions on restore. Nothing else of GuestMemory is used there."""

    def __init__(self, gm: GuestMemory) -> None:
        self._gm = gm
        self.chain = gm._chain

    @property
    def page_size(self) -> int:
        return self._gm._page_size

    @property
    def vm(self) -> VM:
        return self._gm._vm

    @property
    def next_uid(self) -> int:
        return self._gm._next_uid

    @next_uid.setter
    def next_uid(self, value: int) -> None:
        self._gm._next_uid = max(self._gm._next_uid, value)

    @contextlib.contextmanager
    def locked(self) -> Iterator[list[Placed]]:
        """Hold the layout lock (no layout change meanwhile) and give the layout."""
        gm = self._gm
        with gm._lock:
            gm._check_open()
            gm._add_consumer(CONSUMER_SNAPSHOT)
            yield gm._index.placed()

    def harvest(self, placed: Placed) -> npt.NDArray[np.uint64]:
        """Take the region's pages dirtied since the last snapshot (caller is ``locked``)."""
        return self._gm._harvest(placed, CONSUMER_SNAPSHOT).words

    @staticmethod
    def give_back(placed: Placed, words: npt.NDArray[np.uint64]) -> None:
        """Return harvested bits (the snapshot was not written)."""
        with placed.tracker.lock:
            placed.tracker.give_back(CONSUMER_SNAPSHOT, words)

    @staticmethod
    def untracked(placed: Placed) -> bool:
        """Whether guest writes since the last snapshot may have gone unlogged: the next
        snapshot must carry the whole region."""
        r = placed.region
        return r._untracked or not placed.flags & (KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY)

    @staticmethod
    def tracked_from_now(placed: Placed) -> None:
        """After a snapshot of the region: later guest writes are logged (when they are)."""
        r = placed.region
        r._untracked = not placed.flags & (KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY)

    def plan_slots(self, wanted: Sequence[int]) -> list[int]:
        return self._gm._ids.plan(wanted)

    def add(self, gpa: int, size: int, *, flags: int, backing: str, align: int | None,
            label: str, slot: int, uid: int) -> Placed:
        return self._gm._add(gpa, size, readonly=bool(flags & KVM_MEM_READONLY),
                             log_dirty=bool(flags & KVM_MEM_LOG_DIRTY_PAGES), backing=backing,
                             align=align, label=label, slot=slot, uid=uid)

    def set_chain(self, chain_id: bytes, seq: int) -> None:
        self.chain.id = chain_id
        self.chain.seq = seq
