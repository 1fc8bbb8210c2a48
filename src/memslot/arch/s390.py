"""s390 (arch/s390/kvm/kvm-s390.c ``kvm_arch_prepare_memory_region``, 6.18): no per-slot
metadata. A ucontrol VM refuses user slots; a protected (PV) VM refuses every change,
DELETE included (so a DELETE fails after the INVALID swap and the generation still moves);
CREATE and MOVE need a 1 MiB aligned ``userspace_addr`` and size and must end within
``mem_limit``."""

from __future__ import annotations

import errno
from typing import Any, ClassVar

from ..engine import change as ch
from ..engine.change import ChangeType, Rule
from ..engine.hooks import ArchHooks, PrepareError
from ..engine.slot import MemorySlot
from ..profile import Profile

SEGMENT = 1 << 20

UCONTROL = Rule("s390-ucontrol", errno.EINVAL, "kvm_arch_prepare_memory_region",
                "user memslots are not allowed on a ucontrol VM")
PROTECTED = Rule("s390-pv", errno.EINVAL, "kvm_arch_prepare_memory_region",
                 "memslots of a protected (PV) VM cannot change")
UADDR_SEGMENT = Rule("s390-uaddr-1m", errno.EINVAL, "kvm_arch_prepare_memory_region",
                     "userspace_addr not 1 MiB aligned")
SIZE_SEGMENT = Rule("s390-size-1m", errno.EINVAL, "kvm_arch_prepare_memory_region",
                    "size not a multiple of 1 MiB")
MEM_LIMIT = Rule("s390-mem-limit", errno.EINVAL, "kvm_arch_prepare_memory_region",
                 "guest_phys_addr + size > mem_limit")


class S390Arch(ArchHooks):
    source_file: ClassVar[str] = "arch/s390/kvm/kvm-s390.c"

    @classmethod
    def huge_page_sizes(cls, page_shift: int) -> tuple[int, ...]:
        """gmap segment (1M) and region-third (2G) entries."""
        return (SEGMENT, 1 << 31)

    @classmethod
    def gpa_limit_text(cls, profile: Profile) -> str:
        return f"{profile.mem_limit:#x}" if profile.mem_limit is not None else "-"

    def prepare(self, change: ChangeType, old: MemorySlot | None, new: MemorySlot | None) -> Any:
        p = self.profile
        slot = new if new is not None else old
        if p.ucontrol and slot is not None and slot.id < p.user_mem_slots:
            raise PrepareError(UCONTROL)
        if p.protected:
            raise PrepareError(PROTECTED)
        if (change is ch.CREATE or change is ch.MOVE) and new is not None:
            if new.userspace_addr & (SEGMENT - 1):
                raise PrepareError(UADDR_SEGMENT)
            size = new.npages << p.page_shift
            if size & (SEGMENT - 1):
                raise PrepareError(SIZE_SEGMENT)
            limit = p.mem_limit if p.mem_limit is not None else (1 << 64) - 1
            if (new.base_gfn << p.page_shift) + size > limit:
                raise PrepareError(MEM_LIMIT)
        return None
