"""The one public VM API, shared by every backend (psutil-style: one interface, several
implementations). :class:`memslot.ModelVM` answers from the model, :class:`memslot.KvmVM`
from /dev/kvm; both raise :class:`memslot.KvmError` with the kernel's errno."""

from __future__ import annotations

import abc

from ..closing import Closing
from ..engine.slot import MemorySlot
from ..request import MemoryRegion

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1


def check_region_fields(region: MemoryRegion) -> None:
    """Reject values the ioctl struct cannot carry (``ValueError``): the kernel never sees them."""
    slot, flags, gpa, size, uaddr, offset, fd = region
    if (
        int is type(slot) is type(flags) is type(gpa) is type(size) is type(uaddr)
        and 0 <= slot <= U32 and 0 <= flags <= U32 and 0 <= gpa <= U64 and 0 <= size <= U64
        and 0 <= uaddr <= U64 and offset == 0 and fd is None
    ):
        return  # the common v1 request
    for name, limit in (
        ("slot", U32),
        ("flags", U32),
        ("guest_phys_addr", U64),
        ("memory_size", U64),
        ("userspace_addr", U64),
        ("guest_memfd_offset", U64),
    ):
        value = getattr(region, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if not 0 <= value <= limit:
            bits = limit.bit_length()
            raise ValueError(f"{name}={value:#x} does not fit the ioctl's {bits}-bit field")
    if region.guest_memfd is not None and not 0 <= region.guest_memfd <= U32:
        raise ValueError(f"guest_memfd={region.guest_memfd} does not fit a u32")


class VM(Closing, abc.ABC):
    """A virtual machine's memslot interface (``ioctl`` on a VM fd)."""

    # -- memslot requests ---------------------------------------------------------------
    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION``. Raises :class:`KvmError` with the kernel's errno."""
        self.apply(MemoryRegion(slot, flags, guest_phys_addr, memory_size, userspace_addr))

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd: int = 0,
        guest_memfd_offset: int = 0,
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION2`` (v6.8+): as v1 plus the guest_memfd binding."""
        self.apply(
            MemoryRegion(
                slot, flags, guest_phys_addr, memory_size, userspace_addr,
                guest_memfd_offset, guest_memfd,
            )
        )

    @abc.abstractmethod
    def apply(self, region: MemoryRegion) -> None:
        """Issue one request (v1 when ``region.guest_memfd is None``, else v2)."""

    @abc.abstractmethod
    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """``KVM_CREATE_GUEST_MEMFD``: returns the new fd number."""

    # -- capabilities ---------------------------------------------------------------------
    @abc.abstractmethod
    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd."""

    @abc.abstractmethod
    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the VM fd with ``args[0..3]``."""

    # -- dirty logging --------------------------------------------------------------------
    @abc.abstractmethod
    def get_dirty_log(self, slot: int) -> bytes:
        """``KVM_GET_DIRTY_LOG``: exactly ``ALIGN(npages, 64) / 8`` bytes."""

    @abc.abstractmethod
    def clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, bitmap: bytes | None
    ) -> None:
        """``KVM_CLEAR_DIRTY_LOG``; ``bitmap=None`` passes a NULL pointer."""

    # -- the slot set ---------------------------------------------------------------------
    @abc.abstractmethod
    def memslots(self, as_id: int = 0) -> list[MemorySlot]:
        """The slots of one address space in gfn order."""

    @abc.abstractmethod
    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> MemorySlot | None:
        """The slot containing ``gfn`` (INVALID slots included, like ``__gfn_to_memslot``)."""

    @property
    @abc.abstractmethod
    def nr_address_spaces(self) -> int:
        """Number of memslot address spaces of this VM."""

    # -- lifetime -------------------------------------------------------------------------
    @abc.abstractmethod
    def close(self) -> None:
        """Release the VM; every later call raises :class:`memslot.errors.ClosedError`."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool: ...
