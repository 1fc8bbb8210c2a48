"""riscv (arch/riscv/kvm/mmu.c ``kvm_arch_prepare_memory_region``): no per-slot metadata;
CREATE, MOVE and FLAGS_ONLY must end *below* the G-stage GPA size (``>=`` fails, EFAULT),
one page stricter than arm64. The VMA walk (PFNMAP with dirty logging) is not modelled."""

from __future__ import annotations

import errno
from typing import Any, ClassVar

from ..engine.change import ChangeType, Rule
from ..engine.hooks import ArchHooks, PrepareError
from ..engine.slot import MemorySlot

GPA_LIMIT = Rule("riscv-gpa", errno.EFAULT, "kvm_arch_prepare_memory_region",
                 "base_gfn + npages >= G-stage GPA size >> PAGE_SHIFT")


class RiscvArch(ArchHooks):
    source_file: ClassVar[str] = "arch/riscv/kvm/mmu.c"

    def prepare(self, change: ChangeType, old: MemorySlot | None, new: MemorySlot | None) -> Any:
        if new is None:
            return None
        bits = self.profile.ipa_bits or 50
        if new.base_gfn + new.npages >= (1 << bits) >> self.profile.page_shift:
            raise PrepareError(GPA_LIMIT)
        return None
