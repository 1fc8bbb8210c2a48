"""The memory slot as callers see it: an immutable view of ``struct kvm_memory_slot``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Final

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


# _replace's "field not given" (None is a value some fields take).
_KEEP: Final[Any] = object()

_FIELDS: Final = ("id", "as_id", "base_gfn", "npages", "flags", "userspace_addr", "arch",
                  "dirty_bitmap", "struct", "gmem", "page_shift")


class MemorySlot:
    """One slot. Fields mirror the kernel struct; ``arch`` is the per-arch metadata
    description (``None`` where no arch data exists or the backend cannot see it),
    ``dirty_bitmap`` the slot's dirty log (``None`` without ``KVM_MEM_LOG_DIRTY_PAGES``),
    ``struct`` the ledger entry of the slot struct itself (model only) and ``gmem`` the
    ``(fd, offset)`` guest_memfd binding, if any; ``page_shift`` the host page size that
    gfns count in (12 on x86, 16 on ppc64 with 64 KiB pages).

    A change to a slot creates a new view (the kernel allocates a new struct per change);
    the bitmap object is carried over when the kernel carries it over. Immutable, and read
    like the record it was (a ``NamedTuple`` before): equal when every field is, iterable in
    field order, ``_replace`` and ``_asdict``. A plain class so that the compiled engine
    builds one natively (it builds one to three per request).
    """

    __slots__ = _FIELDS
    _fields: ClassVar[tuple[str, ...]] = _FIELDS

    def __init__(
        self,
        id: int,
        as_id: int,
        base_gfn: int,
        npages: int,
        flags: int,
        userspace_addr: int,
        arch: Any = None,
        dirty_bitmap: DirtyBitmap | None = None,
        struct: AllocGroup | None = None,
        gmem: tuple[int, int] | None = None,
        page_shift: int = PAGE_SHIFT,
    ) -> None:
        self.id = id
        self.as_id = as_id
        self.base_gfn = base_gfn
        self.npages = npages
        self.flags = flags
        self.userspace_addr = userspace_addr
        self.arch = arch
        self.dirty_bitmap = dirty_bitmap
        self.struct = struct
        self.gmem = gmem
        self.page_shift = page_shift

    def _astuple(self) -> tuple[Any, ...]:
        return (self.id, self.as_id, self.base_gfn, self.npages, self.flags,
                self.userspace_addr, self.arch, self.dirty_bitmap, self.struct, self.gmem,
                self.page_shift)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._astuple())

    def __len__(self) -> int:
        return len(_FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MemorySlot):
            return NotImplemented
        return self is other or self._astuple() == other._astuple()

    def __ne__(self, other: object) -> bool:
        if not isinstance(other, MemorySlot):
            return NotImplemented
        return not (self is other or self._astuple() == other._astuple())

    def __hash__(self) -> int:
        return hash(self._astuple())

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={value!r}" for name, value in
                          zip(_FIELDS, self._astuple(), strict=True))
        return f"MemorySlot({inner})"

    def _asdict(self) -> dict[str, Any]:
        return dict(zip(_FIELDS, self._astuple(), strict=True))

    def _replace(
        self,
        *,
        id: Any = _KEEP,
        as_id: Any = _KEEP,
        base_gfn: Any = _KEEP,
        npages: Any = _KEEP,
        flags: Any = _KEEP,
        userspace_addr: Any = _KEEP,
        arch: Any = _KEEP,
        dirty_bitmap: Any = _KEEP,
        struct: Any = _KEEP,
        gmem: Any = _KEEP,
        page_shift: Any = _KEEP,
    ) -> MemorySlot:
        """A copy with the fields given replaced."""
        return MemorySlot(
            self.id if id is _KEEP else id,
            self.as_id if as_id is _KEEP else as_id,
            self.base_gfn if base_gfn is _KEEP else base_gfn,
            self.npages if npages is _KEEP else npages,
            self.flags if flags is _KEEP else flags,
            self.userspace_addr if userspace_addr is _KEEP else userspace_addr,
            self.arch if arch is _KEEP else arch,
            self.dirty_bitmap if dirty_bitmap is _KEEP else dirty_bitmap,
            self.struct if struct is _KEEP else struct,
            self.gmem if gmem is _KEEP else gmem,
            self.page_shift if page_shift is _KEEP else page_shift,
        )

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
