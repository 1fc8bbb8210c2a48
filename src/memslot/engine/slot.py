"""The memory slot as callers see it: an immutable view of ``struct kvm_memory_slot``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from ..constants import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_INVALID,
    PAGE_SHIFT,
    flag_names,
)

if TYPE_CHECKING:
    from .dirty import DirtyBitmap
    from .ledger import AllocGroup


class MemorySlot(NamedTuple):
    """One slot. Fields mirror the kernel struct; ``arch`` is the per-arch metadata
    description (``None`` where no arch data exists or the backend cannot see it),
    ``dirty_bitmap`` the slot's dirty log (``None`` without ``KVM_MEM_LOG_DIRTY_PAGES``),
    ``struct`` the ledger entry of the slot struct itself (model only) and ``gmem`` the
    ``(fd, offset)`` guest_memfd binding, if any; ``page_shift`` the host page size that
    gfns count in (12 on x86, 16 on ppc64 with 64 KiB pages).

    A change to a slot creates a new view (the kernel allocates a new struct per change);
    the bitmap object is carried over when the kernel carries it over.
    """

    id: int
    as_id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    arch: Any = None
    dirty_bitmap: DirtyBitmap | None = None
    struct: AllocGroup | None = None
    gmem: tuple[int, int] | None = None
    page_shift: int = PAGE_SHIFT

    @property
    def end_gfn(self) -> int:
        """First gfn past the slot."""
        return self.base_gfn + self.npages

    @property
    def guest_phys_addr(self) -> int:
        return self.base_gfn << self.page_shift

    @property
    def memory_size(self) -> int:
        return self.npages << self.page_shift

    @property
    def invalid(self) -> bool:
        """True while a DELETE or MOVE is in flight (``KVM_MEMSLOT_INVALID``)."""
        return bool(self.flags & KVM_MEMSLOT_INVALID)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def dirty_logging(self) -> bool:
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)

    def contains_gfn(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def describe(self) -> str:
        return (
            f"slot {self.as_id}:{self.id} gfn {self.base_gfn:#x}+{self.npages:#x} "
            f"ua {self.userspace_addr:#x} flags {flag_names(self.flags)}"
        )
