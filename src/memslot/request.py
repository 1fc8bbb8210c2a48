"""A ``KVM_SET_USER_MEMORY_REGION{,2}`` request as plain data (``struct
kvm_userspace_memory_region{,2}`` in include/uapi/linux/kvm.h)."""

from __future__ import annotations

from typing import Any, Final, NamedTuple

from .constants import KVM_ADDRESS_SPACE_SHIFT, PAGE_SHIFT, flag_names


class MemoryRegion(NamedTuple):
    """One request. ``slot`` is the raw ioctl field: address space in bits 16..31, id below.

    ``guest_memfd`` is ``None`` for the v1 ioctl (``KVM_SET_USER_MEMORY_REGION``) and the fd
    number for v2 (``KVM_SET_USER_MEMORY_REGION2``); v1 zeroes the v2-only fields.
    """

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd_offset: int = 0
    guest_memfd: int | None = None

    @property
    def as_id(self) -> int:
        """Address-space id, ``slot >> 16`` (kvm_set_memory_region)."""
        return self.slot >> KVM_ADDRESS_SPACE_SHIFT

    @property
    def id(self) -> int:
        """Slot id within the address space, ``slot & 0xffff``."""
        return self.slot & 0xFFFF

    @property
    def v2(self) -> bool:
        """True for ``KVM_SET_USER_MEMORY_REGION2``."""
        return self.guest_memfd is not None

    @property
    def npages(self) -> int:
        return self.memory_size >> PAGE_SHIFT

    @property
    def base_gfn(self) -> int:
        return self.guest_phys_addr >> PAGE_SHIFT

    def describe(self) -> str:
        """Short human form used in error messages and listings."""
        text = (
            f"slot={self.as_id}:{self.id} flags={flag_names(self.flags)} "
            f"gpa={self.guest_phys_addr:#x} size={self.memory_size:#x} "
            f"ua={self.userspace_addr:#x}"
        )
        if self.guest_memfd is not None:
            text += f" gmem={self.guest_memfd}@{self.guest_memfd_offset:#x}"
        return text


# Final: compiled, a C static (the class name is a globals lookup on every call otherwise).
_REGION: Final = MemoryRegion


def plain_v1(region: Any) -> bool:
    """True for the common request: a v1 ``MemoryRegion`` whose fields are ints that fit the
    ioctl struct (the backends' field check passes it at once; anything else it looks at
    field by field)."""
    if type(region) is not _REGION:
        return False
    # Fields as plain objects (a field typed int would be type-checked on the way out and
    # raise, where this check must answer False); range checks by shifts: compiled, a
    # compare with 2^64 - 1 (not a small int) takes the slow path every time.
    t: tuple[object, ...] = region
    slot = t[0]
    flags = t[1]
    gpa = t[2]
    size = t[3]
    uaddr = t[4]
    return (
        type(slot) is int and type(flags) is int and type(gpa) is int and type(size) is int
        and type(uaddr) is int
        and slot >= 0 and not slot >> 32 and flags >= 0 and not flags >> 32
        and gpa >= 0 and not gpa >> 64 and size >= 0 and not size >> 64
        and uaddr >= 0 and not uaddr >> 64
        and t[5] == 0 and t[6] is None
    )


def slot_field(as_id: int, slot_id: int) -> int:
    """Compose the ioctl's ``slot`` field from an address space and an id."""
    return (as_id << KVM_ADDRESS_SPACE_SHIFT) | slot_id
