"""arm64 (arch/arm64/kvm/mmu.c ``kvm_arch_prepare_memory_region``, 5.10 to 7.3): no per-slot
metadata; CREATE, MOVE and FLAGS_ONLY must end within the IPA space (EFAULT otherwise). Then
the walk over the VMAs of the host range, in address order: dirty logging over a
``VM_PFNMAP`` VMA is EINVAL (every version). Unlike riscv, arm64 never asks for ``VM_WRITE``: a
writable slot over read-only memory is accepted (the fault fails later). The model walks the
VMAs it knows of (:class:`~memslot.engine.vmas.VmaMap`).

Not modelled (nothing in /proc shows what they read): MTE VMs (``KVM_CAP_ARM_MTE``, which the
model does not offer) refuse a ``VM_SHARED`` VMA (6.1) or one without ``VM_MTE_ALLOWED``
(6.12+); from 7.2 a cacheable ``VM_PFNMAP`` VMA is EINVAL on CPUs without both S2FWB and DIC
(``kvm_supports_cacheable_pfnmap``; QEMU's ``-cpu max`` has both).
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar

from ..constants import (
    KVM_CAP_ARM_VM_IPA_SIZE,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEMSLOT_GMEM_ONLY,
)
from ..engine.change import ChangeType, Rule
from ..engine.hooks import ArchHooks, PrepareError, table_block_sizes
from ..engine.slot import MemorySlot
from ..engine.vmas import VmFlag
from ..profile import Profile

#: KVM_PHYS_SHIFT: a default VM type's IPA size.
DEFAULT_IPA_BITS = 40


def ipa_gfns(profile: Profile) -> int:
    """``kvm_phys_size(mmu) >> PAGE_SHIFT``: the gfns of the VM's IPA space."""
    return (1 << (profile.ipa_bits or DEFAULT_IPA_BITS)) >> profile.page_shift


IPA_LIMIT = Rule("arm64-ipa", errno.EFAULT, "kvm_arch_prepare_memory_region",
                 "base_gfn + npages > IPA size >> PAGE_SHIFT")
GMEM_ONLY = Rule("arm64-gmem-only", errno.EINVAL, "kvm_arch_prepare_memory_region",
                 "guest_memfd slots must be mappable (GUEST_MEMFD_FLAG_MMAP)")
VMA_PFNMAP_DIRTY = Rule("arm64-pfnmap-dirty", errno.EINVAL, "kvm_arch_prepare_memory_region",
                        "LOG_DIRTY_PAGES over a VM_PFNMAP VMA (IO memory)")


class Arm64Arch(ArchHooks):
    source_file: ClassVar[str] = "arch/arm64/kvm/mmu.c"
    tagged_user_addresses: ClassVar[bool] = True
    walks_vmas: ClassVar[bool] = True
    unknown_vm_ioctl_errno: ClassVar[int] = errno.EINVAL
    guest_addr_space: ClassVar[str | None] = "IPA"
    arch_caps: ClassVar[frozenset[int]] = frozenset({KVM_CAP_ARM_VM_IPA_SIZE})

    @classmethod
    def huge_page_sizes(cls, page_shift: int) -> tuple[int, ...]:
        """Stage-2 block mappings at PMD and PUD level (``fault_supports_stage2_huge_mapping``
        decides per fault: no per-slot structure)."""
        return table_block_sizes(page_shift)

    @classmethod
    def gfn_limit(cls, profile: Profile) -> int | None:
        return ipa_gfns(profile)

    @classmethod
    def gpa_limit_text(cls, profile: Profile) -> str:
        return f"{profile.ipa_bits or DEFAULT_IPA_BITS}-bit"

    def prepare(self, change: ChangeType, old: MemorySlot | None, new: MemorySlot | None) -> Any:
        if new is None:
            return None
        if new.base_gfn + new.npages > ipa_gfns(self.profile):
            raise PrepareError(IPA_LIMIT)
        gmem_only = new.flags & KVM_MEMSLOT_GMEM_ONLY
        if old is None and new.flags & KVM_MEM_GUEST_MEMFD and not gmem_only:
            raise PrepareError(GMEM_ONLY)
        if new.flags & KVM_MEM_LOG_DIRTY_PAGES:
            start = new.userspace_addr
            end = start + (new.npages << self.profile.page_shift)
            for vma in self.vmas.walk(start, end, True):
                if vma.flags & VmFlag.PFNMAP:
                    raise PrepareError(VMA_PFNMAP_DIRTY, vma.describe())
        return None
