"""One address space's set of memslots (``struct kvm_memslots``): an id hash, a gfn-ordered
index and an hva interval index, so lookups and updates never scan all slots (the kernel's
rbtree, interval tree and hash since v5.17, "KVM: Scalable memslots implementation")."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from ..constants import KVM_MEMSLOT_INVALID, PAGE_SHIFT
from .hva_index import HvaIndex
from .slot import MemorySlot
from .sorted_ints import SortedInts

# KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS: bit 63 of a generation while a swap is in flight.
GEN_UPDATE_IN_PROGRESS: Final = 1 << 63


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

    # -- integrity ---------------------------------------------------------------------------
    def check(self, nr_as: int) -> list[str]:
        """Problems with the set (empty when consistent): slots in gfn order without
        overlap, none left INVALID or empty, the three indexes agreeing, and the generation
        stable and ``as_id`` modulo ``nr_as`` (``kvm_swap_active_memslots``)."""
        problems: list[str] = []
        prev: MemorySlot | None = None
        seen = 0
        for base in self.bases:
            slot = self.by_base.get(base)
            if slot is None:
                problems.append(f"address space {self.as_id}: gfn {base:#x} in the gfn index "
                                f"has no slot")
                continue
            seen += 1
            name = f"slot {slot.as_id}:{slot.id}"
            if slot.as_id != self.as_id:
                problems.append(f"{name} filed under address space {self.as_id}")
            if slot.base_gfn != base:
                problems.append(f"{name} filed under gfn {base:#x}")
            if self.by_id.get(slot.id) is not slot:
                problems.append(f"{name} missing from the id index")
            if slot.flags & KVM_MEMSLOT_INVALID:
                problems.append(f"{name} still INVALID outside an update")
            if slot.npages <= 0:
                problems.append(f"{name} has {slot.npages} pages")
            if prev is not None and prev.base_gfn + prev.npages > slot.base_gfn:
                problems.append(f"slots {prev.id} and {slot.id} overlap or are out of order")
            prev = slot
        if seen != len(self.by_id) or seen != len(self.by_base) or len(self.bases) != seen:
            problems.append(f"address space {self.as_id}: indexes disagree ({seen} in gfn "
                            f"order, {len(self.by_id)} by id, {len(self.by_base)} by base, "
                            f"{len(self.bases)} bases)")
        problems.extend(self.bases.check())
        expect = sorted((*self._hva_range(slot), slot.id) for slot in self.by_id.values())
        if sorted(self.hva.items()) != expect:
            problems.append(f"address space {self.as_id}: hva index does not match the slots")
        gen = self.generation
        if gen & GEN_UPDATE_IN_PROGRESS:
            problems.append(f"address space {self.as_id}: generation {gen:#x} left in "
                            f"progress")
        elif gen % nr_as != self.as_id % nr_as:
            problems.append(f"address space {self.as_id}: generation {gen} not {self.as_id} "
                            f"mod {nr_as}")
        return problems
