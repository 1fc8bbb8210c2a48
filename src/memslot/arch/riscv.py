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
from ..engine.hooks import ArchHooks, PrepareError, table_block_sizes
from ..engine.slot import MemorySlot
from ..engine.vmas import VmFlag
from ..profile import Profile

#: Sv48x4: the G-stage size the model assumes when the profile names none.
DEFAULT_GPA_BITS = 50


def gstage_gfns(profile: Profile) -> int:
    """``kvm_riscv_gstage_gpa_size >> PAGE_SHIFT``: the gfns of the G-stage space."""
    return (1 << (profile.ipa_bits or DEFAULT_GPA_BITS)) >> profile.page_shift


GPA_LIMIT = Rule("riscv-gpa", errno.EFAULT, "kvm_arch_prepare_memory_region",
                 "base_gfn + npages >= G-stage GPA size >> PAGE_SHIFT")
VMA_WRITE = Rule("riscv-vma-write", errno.EPERM, "kvm_arch_prepare_memory_region",
                 "a writable slot over a VMA without VM_WRITE (e.g. a program's text)")
VMA_PFNMAP_DIRTY = Rule("riscv-pfnmap-dirty", errno.EINVAL, "kvm_arch_prepare_memory_region",
                        "LOG_DIRTY_PAGES over a VM_PFNMAP VMA (IO memory)")


class RiscvArch(ArchHooks):
    source_file: ClassVar[str] = "arch/riscv/kvm/mmu.c"
    walks_vmas: ClassVar[bool] = True
    unknown_vm_ioctl_errno: ClassVar[int] = errno.EINVAL
    guest_addr_space: ClassVar[str | None] = "G-stage GPA"

    @classmethod
    def huge_page_sizes(cls, page_shift: int) -> tuple[int, ...]:
        """G-stage megapages and gigapages (PMD and PUD level)."""
        return table_block_sizes(page_shift)

    @classmethod
    def gfn_limit(cls, profile: Profile) -> int | None:
        # base_gfn + npages >= size fails: the last gfn a slot covers is size - 2.
        return gstage_gfns(profile) - 1

    @classmethod
    def gpa_limit_text(cls, profile: Profile) -> str:
        return f"{profile.ipa_bits or DEFAULT_GPA_BITS}-bit"

    def prepare(self, change: ChangeType, old: MemorySlot | None, new: MemorySlot | None) -> Any:
        if new is None:
            return None
        if new.base_gfn + new.npages >= gstage_gfns(self.profile):
            raise PrepareError(GPA_LIMIT)
        start = new.userspace_addr
        end = start + (new.npages << self.profile.page_shift)
        writable = not new.flags & KVM_MEM_READONLY
        logging = bool(new.flags & KVM_MEM_LOG_DIRTY_PAGES)
        if not writable and not logging:
            return None  # the walk can refuse nothing: the VMAs need not be known
        for vma in self.vmas.walk(start, end, logging):
            if writable and not vma.flags & VmFlag.WRITE:
                raise PrepareError(VMA_WRITE, vma.describe())
            if logging and vma.flags & VmFlag.PFNMAP:
                raise PrepareError(VMA_PFNMAP_DIRTY, vma.describe())
        return None
