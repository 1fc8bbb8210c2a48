"""arm64 (arch/arm64/kvm/mmu.c ``kvm_arch_prepare_memory_region``, 6.18): no per-slot
metadata; CREATE, MOVE and FLAGS_ONLY must end within the IPA space (EFAULT otherwise).

Not modelled: the VMA walk over the hva range (MTE VMs need MTE-capable VMAs; ``VM_PFNMAP``
VMAs refuse dirty logging), because the model has no host mappings to look at.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar

from ..constants import KVM_MEM_GUEST_MEMFD, KVM_MEMSLOT_GMEM_ONLY
from ..engine.change import ChangeType, Rule
from ..engine.hooks import ArchHooks, PrepareError
from ..engine.slot import MemorySlot

IPA_LIMIT = Rule("arm64-ipa", errno.EFAULT, "kvm_arch_prepare_memory_region",
                 "base_gfn + npages > IPA size >> PAGE_SHIFT")
GMEM_ONLY = Rule("arm64-gmem-only", errno.EINVAL, "kvm_arch_prepare_memory_region",
                 "guest_memfd slots must be mappable (GUEST_MEMFD_FLAG_MMAP)")


class Arm64Arch(ArchHooks):
    source_file: ClassVar[str] = "arch/arm64/kvm/mmu.c"
    tagged_user_addresses: ClassVar[bool] = True

    def prepare(self, change: ChangeType, old: MemorySlot | None, new: MemorySlot | None) -> Any:
        if new is None:
            return None
        bits = self.profile.ipa_bits or 40
        if new.base_gfn + new.npages > (1 << bits) >> self.profile.page_shift:
            raise PrepareError(IPA_LIMIT)
        gmem_only = new.flags & KVM_MEMSLOT_GMEM_ONLY
        if old is None and new.flags & KVM_MEM_GUEST_MEMFD and not gmem_only:
            raise PrepareError(GMEM_ONLY)
        return None
