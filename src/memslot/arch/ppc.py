"""PowerPC book3s memslot metadata (arch/powerpc/kvm/book3s_hv.c, book3s_pr.c, v5.17+).

HV keeps one ``unsigned long`` rmap entry per guest page, allocated on CREATE (``vzalloc``,
refused with ENOMEM when it would exceed ``totalram_pages()``) and *carried over* on MOVE and
FLAGS_ONLY (``new->arch.rmap = old->arch.rmap``): the rmap is indexed by page offset in the
slot, so the base does not change its shape, and commit never frees ``old->arch`` on MOVE —
reallocating there would leak the old array. PR keeps no per-slot metadata.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import Any, ClassVar

from ..engine import change as ch
from ..engine.change import ChangeType, Rule
from ..engine.hooks import ArchHooks, PrepareError
from ..engine.ledger import KIND_PPC_RMAP, Allocation, AllocGroup
from ..engine.slot import MemorySlot

VARIANT_REALLOC_RMAP_ON_MOVE = "ppc-realloc-rmap-on-move"
RMAP_ENTRY_SIZE = 8

RMAP_TOTALRAM = Rule("ppc-rmap-totalram", errno.ENOMEM, "kvmppc_core_prepare_memory_region_hv",
                     "rmap would need more pages than totalram_pages()")
ALLOC_RMAP = Rule("ppc-alloc-rmap", errno.ENOMEM, "kvmppc_core_prepare_memory_region_hv",
                  "vzalloc of the rmap failed")
VCORE_COLLISION = Rule("ppc-vcore-collision", errno.EINVAL, "kvmppc_core_vcpu_create_hv",
                       "POWER9 and later: one vCPU per virtual core, and this id's core is taken")
VCPU_ID_TOO_HIGH = Rule("ppc-vcpu-id", errno.EINVAL, "kvmppc_core_vcpu_create_hv",
                        "POWER9 and later: id >= KVM_MAX_VCPUS * emul_smt_mode (1)")


class PpcHvArch(ArchHooks):
    """book3s HV: ``arch.rmap`` is a single :class:`Allocation` (or ``None``)."""

    VARIANTS: ClassVar[tuple[str, ...]] = (VARIANT_REALLOC_RMAP_ON_MOVE,)
    source_file: ClassVar[str] = "arch/powerpc/kvm/powerpc.c"
    slot_arch_struct_bytes: ClassVar[int] = 8  # unsigned long *rmap

    @classmethod
    def huge_page_sizes(cls, page_shift: int) -> tuple[int, ...]:
        """The radix partition-scoped tree's PMD and PUD leaves (``kvmppc_create_pte``
        levels 1 and 2): 2M and 1G with 4 KiB and 64 KiB base pages alike."""
        return (1 << 21, 1 << 30)

    def vcpu_create(self, vcpu_id: int, existing: frozenset[int]) -> Rule | None:
        """``kvmppc_core_vcpu_create_hv`` on CPU_FTR_ARCH_300 (POWER9, the lab's ppc64el):
        ids map one to one onto virtual cores below ``KVM_MAX_VCPUS * emul_smt_mode`` (the
        default SMT mode 1), and a taken core is EINVAL, before the generic EEXIST."""
        if vcpu_id >= self.profile.max_vcpus:
            return VCPU_ID_TOO_HIGH
        if vcpu_id in existing:
            return VCORE_COLLISION
        return None

    def prepare(self, change: ChangeType, old: MemorySlot | None, new: MemorySlot | None) -> Any:
        if new is None:
            return None  # DELETE
        realloc = change is ch.MOVE and VARIANT_REALLOC_RMAP_ON_MOVE in self.variants
        if change is ch.CREATE or realloc:
            npages = new.npages
            size = npages * RMAP_ENTRY_SIZE
            if size >> self.profile.page_shift > self.profile.totalram_pages:
                raise PrepareError(RMAP_TOTALRAM)
            a = self.ledger.alloc(new.as_id, new.id,
                                  self.ledger.spec(KIND_PPC_RMAP, npages, RMAP_ENTRY_SIZE))
            if a is None:
                raise PrepareError(ALLOC_RMAP)
            return a
        assert old is not None
        return old.arch  # MOVE and FLAGS_ONLY share the old rmap

    def free(self, slot: MemorySlot) -> None:
        if slot.arch is not None:
            self.ledger.free(slot.arch)

    def groups(self, arch: Any) -> tuple[AllocGroup, ...]:
        return () if arch is None else (arch,)

    def allocations(self, arch: Any) -> Iterable[Allocation]:
        return () if arch is None else tuple(arch.items)

    def check_slot(self, slot: MemorySlot) -> list[str]:
        name = f"slot {slot.as_id}:{slot.id}"
        if slot.arch is None:
            return [f"{name}: no rmap"]
        a: Allocation = slot.arch.items[0]
        if a.entries != slot.npages:
            return [f"{name}: rmap has {a.entries} entries for {slot.npages} pages"]
        return []

    def describe(self, slot: MemorySlot) -> dict[str, Any]:
        if slot.arch is None:
            return {}
        a: Allocation = slot.arch.items[0]
        return {"arrays": [{"array": "rmap", "entries": a.entries, "bytes": a.bytes,
                            "vmalloc_bytes": a.vmalloc_bytes}]}


class PpcPrArch(ArchHooks):
    """book3s PR (and booke): prepare returns 0, nothing to free."""

    source_file: ClassVar[str] = "arch/powerpc/kvm/powerpc.c"
    slot_arch_struct_bytes: ClassVar[int] = 8  # book3s: the rmap pointer, unused by PR
