"""One address space's set of memslots (``struct kvm_memslots``): an id hash, a gfn-ordered
index and an hva interval index, so lookups and updates never scan all slots (the kernel's
rbtree, interval tree and hash since v5.17, "KVM: Scalable memslots implementation")."""

from __future__ import annotations

from collections.abc import Iterator

from ..constants import PAGE_SHIFT
from .hva_index import HvaIndex
from .slot import MemorySlot
from .sorted_ints import SortedInts


class SlotSet:
    """The active slots of one address space and its generation."""

    __slots__ = ("as_id", "bases", "by_base", "by_id", "generation", "hva", "last_used",
                 "page_shift")

    def __init__(self, as_id: int, page_shift: int = PAGE_SHIFT) -> None:
        self.as_id = as_id
        self.page_shift = page_shift
        self.by_id: dict[int, MemorySlot] = {}
        self.by_base: dict[int, MemorySlot] = {}
        self.bases = SortedInts()
        self.hva = HvaIndex()
        # kvm_create_vm: address space i starts at generation i.
        self.generation = as_id
        self.last_used: MemorySlot | None = None

    def __len__(self) -> int:
        return len(self.by_id)

    def __iter__(self) -> Iterator[MemorySlot]:
        """Slots in gfn order."""
        by_base = self.by_base
        return (by_base[b] for b in self.bases)

    # -- updates (callers publish atomically with respect to readers) ----------------------
    def _hva_range(self, slot: MemorySlot) -> tuple[int, int]:
        return slot.userspace_addr, slot.userspace_addr + (slot.npages << self.page_shift) - 1

    def insert(self, slot: MemorySlot) -> None:
        self.by_id[slot.id] = slot
        self.by_base[slot.base_gfn] = slot
        self.bases.add(slot.base_gfn)
        if slot.npages:
            start, last = self._hva_range(slot)
            self.hva.insert(start, last, slot.id)

    def remove(self, slot: MemorySlot) -> None:
        del self.by_id[slot.id]
        del self.by_base[slot.base_gfn]
        self.bases.remove(slot.base_gfn)
        if slot.npages:
            start, last = self._hva_range(slot)
            self.hva.remove(start, last, slot.id)
        if self.last_used is slot:
            self.last_used = None

    def replace(self, old: MemorySlot, new: MemorySlot) -> None:
        """Swap ``old`` for ``new`` (same id) in every index (``kvm_replace_memslot``)."""
        self.by_id[new.id] = new
        if old.base_gfn == new.base_gfn:
            self.by_base[new.base_gfn] = new
        else:
            del self.by_base[old.base_gfn]
            self.by_base[new.base_gfn] = new
            self.bases.replace(old.base_gfn, new.base_gfn)
        if old.userspace_addr != new.userspace_addr or old.npages != new.npages:
            if old.npages:
                self.hva.remove(*self._hva_range(old), old.id)
            if new.npages:
                self.hva.insert(*self._hva_range(new), new.id)
        if self.last_used is old:
            self.last_used = new

    # -- lookups -----------------------------------------------------------------------------
    def find(self, gfn: int) -> MemorySlot | None:
        """The slot containing ``gfn`` (``search_memslots`` with the ``last_used_slot`` cache)."""
        slot = self.last_used
        if slot is not None and slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
            return slot
        base = self.bases.le(gfn)
        if base is None:
            return None
        slot = self.by_base[base]
        if gfn < base + slot.npages:
            self.last_used = slot
            return slot
        return None

    def in_gfn_range(self, start: int, end: int) -> Iterator[MemorySlot]:
        """Slots intersecting ``[start, end)`` in gfn order
        (``kvm_for_each_memslot_in_gfn_range``: step back one from the lower bound)."""
        by_base = self.by_base
        first = self.bases.le(start)
        if first is None or first + by_base[first].npages <= start:
            first = start
        for base in self.bases.iter_from(first):
            if base >= end:
                return
            yield by_base[base]

    def overlapping_other(self, slot_id: int, start: int, end: int) -> MemorySlot | None:
        """First slot with another id intersecting ``[start, end)`` (``kvm_check_memslot_overlap``).

        Slots of one set are disjoint, so walking down from the last slot that starts below
        ``end`` meets at most the slot itself before an answer.
        """
        bases = self.bases
        by_base = self.by_base
        base = bases.lt(end)
        while base is not None:
            slot = by_base[base]
            if base + slot.npages <= start:
                return None
            if slot.id != slot_id:
                return slot
            base = bases.lt(base)
        return None

    def hva_lookup(self, hva: int) -> list[MemorySlot]:
        by_id = self.by_id
        return [by_id[i] for i in self.hva.stab(hva)]
