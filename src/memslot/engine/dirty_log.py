"""The dirty-log ioctls of kvm_main.c (6.18): ``KVM_GET_DIRTY_LOG``
(``kvm_get_dirty_log_protect``), ``KVM_CLEAR_DIRTY_LOG`` (``kvm_clear_dirty_log_protect``),
the dirty-logging capabilities of ``kvm_vm_ioctl_enable_cap_generic`` and
``mark_page_dirty_in_slot``. Checks run in the kernel's order; failures raise ``KvmError``."""

from __future__ import annotations

from ..constants import (
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_CAP_HALT_POLL,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_GFN_SIZE,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEM_LOG_DIRTY_PAGES,
)
from ..errors import KvmError
from . import change as ch
from .caps import enable_halt_poll
from .change import Rule
from .dirty import dirty_bitmap_bytes
from .memslots import Memslots
from .slot import MemorySlot


def _fail(rule: Rule, what: str) -> KvmError:
    return KvmError(rule.errno, str(rule), what)


class DirtyLog:
    """Dirty-log operations on a :class:`Memslots`."""

    def __init__(self, memslots: Memslots) -> None:
        self.m = memslots
        self.created_vcpus = 0
        #: ``kvm->max_halt_poll_ns`` once KVM_CAP_HALT_POLL set it (``None``: the default).
        self.max_halt_poll_ns: int | None = None
        #: Entries pushed to the (single, model-wide) dirty ring: ``(slot field, offset)``.
        self.ring: list[tuple[int, int]] = []

    def _check_log_target(self, slot: int, what: str) -> None:
        """The checks before the slot lookup: a dirty ring without bitmap (ENXIO), then the
        address space and id (EINVAL)."""
        m = self.m
        if not m.dirty.use_dirty_bitmap:
            raise _fail(ch.DIRTY_RING, what)
        as_id, slot_id = slot >> 16, slot & 0xFFFF
        if as_id >= m.nr_as or slot_id >= m.profile.user_mem_slots:
            raise _fail(ch.DIRTY_SLOT_ID, what)

    def _lookup(self, slot: int, what: str) -> MemorySlot:
        memslot = self.m.by_id(slot >> 16, slot & 0xFFFF)
        if memslot is None or memslot.dirty_bitmap is None:
            raise _fail(ch.DIRTY_NO_SLOT, what)
        return memslot

    def get(self, slot: int) -> bytes:
        """``KVM_GET_DIRTY_LOG``: ``ALIGN(npages, 64) / 8`` bytes. Without manual protect the
        log is cleared as it is read (the kernel swaps each word with 0)."""
        what = f"KVM_GET_DIRTY_LOG slot={slot >> 16}:{slot & 0xFFFF}"
        with self.m.slots_lock:
            self._check_log_target(slot, what)
            memslot = self._lookup(slot, what)
            bitmap = memslot.dirty_bitmap
            assert bitmap is not None
            if self.m.dirty.manual_dirty_log_protect:
                return bitmap.to_bytes()
            return bitmap.harvest()

    def clear(self, slot: int, first_page: int, num_pages: int, bitmap: bytes | None) -> None:
        """``KVM_CLEAR_DIRTY_LOG``: clear ``mask & log`` per 64-page word from ``first_page``.
        ``bitmap=None`` is a NULL pointer: fine when no byte needs reading."""
        what = (f"KVM_CLEAR_DIRTY_LOG slot={slot >> 16}:{slot & 0xFFFF} "
                f"first_page={first_page} num_pages={num_pages}")
        m = self.m
        if not m.profile.manual_dirty_log_caps:
            raise _fail(ch.CLEAR_UNSUPPORTED, what)
        with m.slots_lock:
            self._check_log_target(slot, what)
            if first_page & 63:
                raise _fail(ch.CLEAR_FIRST_PAGE, what)
            memslot = self._lookup(slot, what)
            npages = memslot.npages
            if (
                first_page > npages
                or num_pages > npages - first_page
                or (num_pages < npages - first_page and num_pages & 63)
            ):
                raise _fail(ch.CLEAR_RANGE, what + f" (slot has {npages} pages)")
            n = dirty_bitmap_bytes(num_pages)
            if n and bitmap is None:
                raise KvmError(14, "kvm_clear_dirty_log_protect: copy_from_user of the mask "
                                   "faulted (NULL bitmap)", what)
            if not n:
                return
            assert bitmap is not None
            data = bitmap.ljust(n, b"\0")[:n] if len(bitmap) < n else bitmap[:n]
            import numpy as np  # here, not at start-up (its import is most of it)

            masks = np.frombuffer(data, dtype="<u8")
            target = memslot.dirty_bitmap
            assert target is not None
            target.clear(first_page >> 6, masks)

    def mark_page_dirty(self, gfn: int, as_id: int = 0) -> bool:
        """``mark_page_dirty`` as a vCPU write would call it: find the slot (INVALID ones
        included, like ``gfn_to_memslot``) and, if it logs dirty pages, push to the ring or set
        the bit. Returns whether anything was recorded. No read-only check: a guest write to a
        READONLY slot exits to user space as MMIO before KVM would mark anything."""
        m = self.m
        with m.srcu:
            memslot = m.sets[as_id].find(gfn)
            if memslot is None or not memslot.flags & KVM_MEM_LOG_DIRTY_PAGES:
                return False
            rel = gfn - memslot.base_gfn
            if m.dirty.dirty_ring_size:
                self.ring.append(((memslot.as_id << 16) | memslot.id, rel))
                return True
            if memslot.dirty_bitmap is not None:
                memslot.dirty_bitmap.set_bit(rel)
                return True
            return False

    # -- capabilities -------------------------------------------------------------------
    def enable_cap(self, cap: int, args: tuple[int, ...], flags: int) -> bool:
        """``kvm_vm_ioctl_enable_cap_generic``: the dirty-logging caps and HALT_POLL; returns
        False for the caps it passes on to the arch (``kvm_vm_ioctl_enable_cap``)."""
        m = self.m
        p = m.profile
        what = f"KVM_ENABLE_CAP cap={cap} args={list(args)} flags={flags}"
        arg0 = args[0] if args else 0
        if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and p.manual_dirty_log_caps:
            allowed = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            if arg0 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                allowed = p.manual_dirty_log_caps
            if flags or arg0 & ~allowed:
                raise _fail(ch.ENABLE_CAP_ARGS, what)
            m.dirty.manual_dirty_log_protect = arg0
            return True
        if cap in (KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
            supported = p.dirty_ring_tso if cap == KVM_CAP_DIRTY_LOG_RING else p.dirty_ring_acq_rel
            if not supported:
                raise _fail(ch.ENABLE_CAP_UNKNOWN, what)
            # kvm_vm_ioctl_enable_dirty_log_ring takes a u32: args[0] is truncated.
            size = arg0 & 0xFFFFFFFF
            if not size or size & (size - 1):
                raise _fail(ch.RING_SIZE, what)
            if size < p.dirty_ring_rsvd_entries * KVM_DIRTY_GFN_SIZE or size < p.page_size:
                raise _fail(ch.RING_SIZE, what)
            if size > p.dirty_ring_max_bytes:
                raise _fail(ch.RING_TOO_BIG, what)
            if m.dirty.dirty_ring_size or self.created_vcpus:
                raise _fail(ch.RING_ONCE, what)
            m.dirty.dirty_ring_size = size
            return True
        if cap == KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP:
            if not p.dirty_ring_with_bitmap or not m.dirty.dirty_ring_size or flags:
                raise _fail(ch.RING_BITMAP, what)
            with m.slots_lock:
                if any(len(s) for s in m.sets):
                    raise _fail(ch.RING_BITMAP, what)
                m.dirty.dirty_ring_with_bitmap = True
            return True
        if cap == KVM_CAP_HALT_POLL:
            self.max_halt_poll_ns = enable_halt_poll(args, flags, what)
            return True
        return False
