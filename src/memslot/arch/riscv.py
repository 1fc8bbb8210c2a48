"""riscv (arch/riscv/kvm/mmu.c ``kvm_arch_prepare_memory_region``, 6.12 to 7.3): no per-slot
metadata; CREATE, MOVE and FLAGS_ONLY must end *below* the G-stage GPA size (``>=`` fails,
EFAULT), one page stricter than arm64. Then the walk over the VMAs of the host range
(``find_vma``/``find_vma_intersection``, in address order): a writable slot (no
``KVM_MEM_READONLY``) over a VMA without ``VM_WRITE`` is EPERM, dirty logging over a
``VM_PFNMAP`` VMA is EINVAL; the first VMA that fails decides. The model walks the VMAs it
knows of (:class:`~memslot.engine.vmas.VmaMap`)."""

from __future__ import annotations

import errno
from typing import Any, ClassVar

from ..constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from ..engine.change import ChangeType, Rule
from ..engine.hooks import ArchHooks, PrepareError
from ..engine.slot import MemorySlot
from ..engine.vmas import VmFlag

GPA_LIMIT = Rule("riscv-gpa", errno.EFAULT, "kvm_arch_prepare_memory_region",
                 "base_gfn + npages >= G-stage GPA size >> PAGE_SHIFT")
VMA_WRITE = Rule("riscv-vma-write", errno.EPERM, "kvm_arch_prepare_memory_region",
                 "a writable slot over a VMA without VM_WRITE (e.g. a program's text)")
VMA_PFNMAP_DIRTY = Rule("riscv-pfnmap-dirty", errno.EINVAL, "kvm_arch_prepare_memory_region",
                        "LOG_DIRTY_PAGES over a VM_PFNMAP VMA (IO memory)")


class RiscvArch(ArchHooks):
    source_file: ClassVar[str] = "arch/riscv/kvm/mmu.c"
    walks_vmas: ClassVar[bool] = True

    def prepare(self, change: ChangeType, old: MemorySlot | None, new: MemorySlot | None) -> Any:
        if new is None:
            return None
        bits = self.profile.ipa_bits or 50
        if new.base_gfn + new.npages >= (1 << bits) >> self.profile.page_shift:
            raise PrepareError(GPA_LIMIT)
        start = new.userspace_addr
        end = start + (new.npages << self.profile.page_shift)
        writable = not new.flags & KVM_MEM_READONLY
        logging = new.flags & KVM_MEM_LOG_DIRTY_PAGES
        for vma in self.vmas.intersecting(start, end):
            if writable and not vma.flags & VmFlag.WRITE:
                raise PrepareError(VMA_WRITE, vma.describe())
            if logging and vma.flags & VmFlag.PFNMAP:
                raise PrepareError(VMA_PFNMAP_DIRTY, vma.describe())
        return None
