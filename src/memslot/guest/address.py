"""Small typed concepts of guest memory, after rust-vmm's vm-memory: :class:`GuestAddress`
(a guest-physical address), :class:`GuestRegion` (one registered region) and the layout
errors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Literal

from ..constants import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, PAGE_SIZE, flag_names
from ..errors import MemslotError

if TYPE_CHECKING:
    from .dirty import DirtyTracker
    from .mapping import HostMapping

__all__ = [
    "GPA_LIMIT",
    "BackingKind",
    "GuestAddress",
    "GuestRegion",
    "LayoutError",
    "page_align_down",
    "page_align_up",
]

#: One past the highest guest-physical address (the ioctl fields are u64).
GPA_LIMIT: Final = 1 << 64

BackingKind = Literal["anon", "memfd", "file"]


class LayoutError(MemslotError, ValueError):
    """A region request that the layout cannot take (overlap, no free slot id, bad size or
    alignment, unknown region); the layout is left as it was."""


def page_align_down(value: int, page_size: int = PAGE_SIZE) -> int:
    return value & ~(page_size - 1)


def page_align_up(value: int, page_size: int = PAGE_SIZE) -> int:
    return (value + page_size - 1) & ~(page_size - 1)


class GuestAddress(int):
    """A guest-physical address: an ``int`` in ``[0, 2**64)`` that prints in hex and offers
    vm-memory's checked arithmetic. ``page_size`` is the VM's (``gfn``, ``page_offset``)."""

    page_size: int

    def __new__(cls, value: int, page_size: int = PAGE_SIZE) -> GuestAddress:
        if not 0 <= int(value) < GPA_LIMIT:
            raise ValueError(f"guest address {int(value):#x} is outside [0, 2**64)")
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two")
        self = super().__new__(cls, value)
        self.page_size = page_size
        return self

    def __repr__(self) -> str:
        return f"GuestAddress({int(self):#x})"

    def checked_add(self, offset: int) -> GuestAddress | None:
        """``self + offset``, or ``None`` past ``2**64 - 1`` (or below 0)."""
        value = int(self) + offset
        return GuestAddress(value, self.page_size) if 0 <= value < GPA_LIMIT else None

    def offset_from(self, base: int) -> int:
        """``self - base`` (``ValueError`` when ``base`` is above ``self``)."""
        if base > self:
            raise ValueError(f"{int(base):#x} is above {int(self):#x}")
        return int(self) - int(base)

    @property
    def gfn(self) -> int:
        """Guest frame number (of the VM's page size)."""
        return int(self) // self.page_size

    @property
    def page_offset(self) -> int:
        return int(self) % self.page_size

    def align_down(self, align: int | None = None) -> GuestAddress:
        """Round down to ``align`` (a power of two; the page size by default)."""
        step = self.page_size if align is None else align
        return GuestAddress(int(self) & ~(step - 1), self.page_size)


class GuestRegion:
    """One region of a :class:`~memslot.guest.GuestMemory`: a host mapping registered as a
    memslot. Read its fields here; change it through the ``GuestMemory`` methods."""

    __slots__ = ("_dirty", "_gpa", "_label", "_mapping", "_page_size", "_slot", "_untracked",
                 "flags", "uid")

    def __init__(
        self,
        uid: int,
        slot: int,
        gpa: int,
        flags: int,
        mapping: HostMapping,
        dirty: DirtyTracker,
        label: str,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self.uid = uid
        self._page_size = page_size
        self._slot = slot
        self._gpa = gpa
        self.flags = flags
        self._mapping = mapping
        self._dirty = dirty
        self._label = label
        #: Guest writes since the last snapshot may have gone unlogged (see snapshot.py).
        self._untracked = True

    # -- fields ---------------------------------------------------------------------------
    @property
    def gpa(self) -> GuestAddress:
        """Where the region is now (a move changes it)."""
        return GuestAddress(self._gpa, self._page_size)

    @property
    def size(self) -> int:
        return self._mapping.size

    @property
    def end(self) -> int:
        """First gpa past the region."""
        return self._gpa + self._mapping.size

    @property
    def npages(self) -> int:
        return self._mapping.size // self._page_size

    @property
    def page_size(self) -> int:
        """The VM's page size."""
        return self._page_size

    @property
    def hva(self) -> int:
        """Host virtual address of the region's first byte."""
        return self._mapping.address

    @property
    def slot(self) -> int:
        """The memslot id."""
        return self._slot

    @property
    def label(self) -> str:
        return self._label

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def log_dirty(self) -> bool:
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)

    @property
    def backing(self) -> BackingKind:
        return self._mapping.kind

    @property
    def path(self) -> str | None:
        """The backing file, for ``backing="file"``."""
        return self._mapping.path

    @property
    def fd(self) -> int | None:
        """The memfd (or file) descriptor, to share the memory with another process; ``None``
        for anonymous memory. Closed when the region is removed."""
        return self._mapping.fd

    @property
    def mapping(self) -> HostMapping:
        return self._mapping

    @property
    def removed(self) -> bool:
        return self._mapping.closed

    def contains(self, gpa: int) -> bool:
        return self._gpa <= gpa < self.end

    def as_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "slot": self._slot,
            "gpa": self._gpa,
            "size": self.size,
            "hva": self.hva,
            "flags": self.flags,
            "flag_names": flag_names(self.flags),
            "backing": self.backing,
            "path": self.path,
            "label": self._label,
        }

    def __repr__(self) -> str:
        label = f" {self._label!r}" if self._label else ""
        return (
            f"<GuestRegion{label} slot {self._slot} gpa [{self._gpa:#x}, {self.end:#x}) "
            f"hva {self.hva:#x} {flag_names(self.flags)}>"
        )
