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


_U32: Final = (1 << 32) - 1
_U64: Final = (1 << 64) - 1


def plain_v1(region: Any) -> bool:
    """True for the common request: a v1 ``MemoryRegion`` whose fields are ints that fit the
    ioctl struct (the backends' field check passes it at once; anything else it looks at
    field by field)."""
    slot, flags, gpa, size, uaddr, offset, fd = region
    return (
        type(slot) is int and type(flags) is int and type(gpa) is int and type(size) is int
        and type(uaddr) is int
        and 0 <= slot <= _U32 and 0 <= flags <= _U32 and 0 <= gpa <= _U64
        and 0 <= size <= _U64 and 0 <= uaddr <= _U64 and offset == 0 and fd is None
    )


def slot_field(as_id: int, slot_id: int) -> int:
    """Compose the ioctl's ``slot`` field from an address space and an id."""
    return (as_id << KVM_ADDRESS_SPACE_SHIFT) | slot_id
