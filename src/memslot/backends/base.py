"""The one public VM API, shared by every backend (psutil-style: one interface, several
implementations). :class:`memslot.ModelVM` answers from the model, :class:`memslot.KvmVM`
from /dev/kvm, :class:`memslot.DualVM` from both; all raise :class:`memslot.KvmError` with
the kernel's errno.

:class:`VM` is everything a user of a VM may rely on, whatever the backend. What only the model
can answer is a separate, optional protocol that callers test for with ``isinstance``:
:class:`ModelIntrospection` (the request records, metadata, ``check()``, observers;
:class:`DualVM` offers it too) and :class:`FaultInjection` (ENOMEM injection and modelled guest
writes, which have no kernel counterpart: the model alone)."""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from ..closing import Closing
from ..engine.slot import MemorySlot
from ..request import MemoryRegion, plain_v1

if TYPE_CHECKING:
    from ..engine.ledger import Allocation, Ledger
    from ..engine.memslots import Observer
    from ..engine.result import OpResult
    from ..engine.vmas import Vma, VmaReader

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1

#: x86-64 ``PAGE_OFFSET`` without KASLR (4-level paging). ``KVM_HVA_ERR_BAD`` is defined as
#: PAGE_OFFSET and ``kvm_is_error_hva(a)`` as ``a >= PAGE_OFFSET``: every error hva lies above
#: all user addresses, whatever the boot-time value.
PAGE_OFFSET = 0xFFFF888000000000
KVM_HVA_ERR_BAD = PAGE_OFFSET
#: ``KVM_HVA_ERR_RO_BAD`` is ``PAGE_OFFSET + PAGE_SIZE`` with the kernel's 4 KiB x86 page.
KVM_HVA_ERR_RO_BAD = PAGE_OFFSET + 4096


def kvm_is_error_hva(hva: int) -> bool:
    """True for ``KVM_HVA_ERR_BAD`` and ``KVM_HVA_ERR_RO_BAD`` (``kvm_is_error_hva``)."""
    return hva >= PAGE_OFFSET


def check_uint(name: str, value: object, limit: int) -> int:
    """``value`` if it is an int that fits an unsigned ioctl field of ``limit``'s width, else
    ``TypeError`` / ``ValueError`` (the same on every backend: the kernel never sees it)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= limit:
        bits = limit.bit_length()
        raise ValueError(f"{name}={value:#x} does not fit the ioctl's {bits}-bit field")
    return value


def check_enable_cap_args(cap: int, args: tuple[int, ...], flags: int) -> None:
    """``struct kvm_enable_cap``: u32 cap, u32 flags, four u64 args."""
    if len(args) > 4:
        raise ValueError(f"KVM_ENABLE_CAP takes at most 4 args, got {len(args)}")
    check_uint("cap", cap, U32)
    check_uint("flags", flags, U32)
    for value in args:
        check_uint("arg", value, U64)


def check_clear_dirty_log_args(slot: int, first_page: int, num_pages: int) -> None:
    """``struct kvm_clear_dirty_log``: u32 slot, u32 num_pages, u64 first_page."""
    check_uint("slot", slot, U32)
    check_uint("first_page", first_page, U64)
    check_uint("num_pages", num_pages, U32)


def check_host_range(addr: int, size: int) -> None:
    """A host mapping ``[addr, addr + size)`` must be a non-empty range of the 64-bit space."""
    check_uint("addr", addr, U64)
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"size must be an int, not {type(size).__name__}")
    if size <= 0 or addr + size > U64 + 1:
        raise ValueError(f"bad host mapping size {size:#x} at {addr:#x}")


def check_region_fields(region: MemoryRegion) -> None:
    """Reject values the ioctl struct cannot carry (``ValueError``): the kernel never sees them."""
    if plain_v1(region):
        return  # the common v1 request
    for name, limit in (
        ("slot", U32),
        ("flags", U32),
        ("guest_phys_addr", U64),
        ("memory_size", U64),
        ("userspace_addr", U64),
        ("guest_memfd_offset", U64),
    ):
        check_uint(name, getattr(region, name), limit)
    if region.guest_memfd is not None:
        check_uint("guest_memfd", region.guest_memfd, U32)


class VmReferences(NamedTuple):
    """What keeps a VM alive (``kvm->users_count``): its fd, and each guest_memfd and vCPU
    fd, which take a reference of their own (``kvm_get_kvm``). The VM and all its slot
    metadata are freed (``kvm_destroy_vm``) when the last one closes."""

    vm_fd: bool
    guest_memfds: tuple[int, ...]
    vcpus: tuple[int, ...]

    @property
    def alive(self) -> bool:
        return self.vm_fd or bool(self.guest_memfds) or bool(self.vcpus)


class VM(Closing, abc.ABC):
    """A virtual machine's memslot interface (``ioctl`` on a VM fd, and the ``/dev/kvm``
    system fd it was created from). Every backend implements all of it."""

    # -- the machine ----------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def page_size(self) -> int:
        """The kernel's ``PAGE_SIZE``: the unit of slot sizes, gpas, user addresses and dirty
        bitmaps (the profile's for the model, the host's for /dev/kvm)."""

    @property
    @abc.abstractmethod
    def nr_address_spaces(self) -> int:
        """Number of memslot address spaces of this VM."""

    # -- memslot requests -----------------------------------------------------------------
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

    # -- guest_memfd ----------------------------------------------------------------------
    @abc.abstractmethod
    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """``KVM_CREATE_GUEST_MEMFD``: returns the new fd number (closed by :meth:`close`)."""

    @abc.abstractmethod
    def close_guest_memfd(self, fd: int) -> None:
        """Close a guest_memfd made by :meth:`create_guest_memfd` (``ValueError`` for any
        other fd). Its bindings become invalid (``kvm_gmem_release``)."""

    # -- vCPUs ----------------------------------------------------------------------------
    @abc.abstractmethod
    def create_vcpu(self, vcpu_id: int | None = None) -> int:
        """``KVM_CREATE_VCPU`` (``vcpu_id`` defaults to the lowest unused id); returns the id.
        The vCPU is closed by :meth:`close_vcpu` or :meth:`close`."""

    @abc.abstractmethod
    def close_vcpu(self, vcpu_id: int) -> None:
        """Close a vCPU made by :meth:`create_vcpu` (``ValueError`` for an unknown id)."""

    # -- capabilities ---------------------------------------------------------------------
    @abc.abstractmethod
    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd."""

    @abc.abstractmethod
    def check_system_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the ``/dev/kvm`` system fd (some answers differ from
        the VM fd's: ``kvm_vm_ioctl_check_extension_generic`` with ``kvm == NULL``)."""

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
    def memslot(self, slot_id: int, as_id: int = 0) -> MemorySlot | None:
        """The slot with this id (``id_to_memslot``), or ``None``."""

    @abc.abstractmethod
    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> MemorySlot | None:
        """The slot containing ``gfn`` (INVALID slots included, like ``__gfn_to_memslot``)."""

    # -- host memory backing the guest ----------------------------------------------------
    @abc.abstractmethod
    def register_host_mapping(
        self, addr: int, size: int, *, writable: bool = True, pfnmap: bool = False
    ) -> None:
        """Declare ``[addr, addr + size)`` memory this process mapped for the guest (a real
        vCPU runs only while every slot lies inside registered memory). ``writable=False``
        says the mapping lacks ``PROT_WRITE`` and ``pfnmap=True`` that it is IO memory
        (``VM_PFNMAP``, e.g. a device BAR): the model's arch walks of the VMAs read both
        (riscv refuses a writable slot over read-only memory); a kernel sees the real VMA."""

    @abc.abstractmethod
    def unregister_host_mapping(self, addr: int, size: int) -> None:
        """Withdraw a range given to :meth:`register_host_mapping` (``ValueError`` if it was
        not registered)."""

    @abc.abstractmethod
    def host_mappings(self) -> list[tuple[int, int]]:
        """Registered ``(addr, size)`` ranges, in registration order."""

    # -- lifetime -------------------------------------------------------------------------
    @abc.abstractmethod
    def sibling(self, vm_type: int = 0) -> VM:
        """Another VM of the same kind on the same host (``KVM_CREATE_VM`` again on the system
        fd this VM came from; the model: the same profile and variants)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the VM, its guest_memfds and vCPUs; every later call raises
        :class:`memslot.errors.ClosedError`. Idempotent."""

    @abc.abstractmethod
    def close_vm_fd(self) -> None:
        """Close the VM fd alone: VM ioctls are refused from now on (``ClosedError``), but
        open guest_memfds and vCPUs keep the VM and its slots alive until closed with
        :meth:`close_guest_memfd` / :meth:`close_vcpu` (or :meth:`close`)."""

    @abc.abstractmethod
    def references(self) -> VmReferences:
        """What still references the VM."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """Whether the VM fd is closed (no more VM ioctls)."""


@runtime_checkable
class ModelIntrospection(Protocol):
    """What only a model can show: the record of each request, the metadata it allocated,
    the generations, the integrity check, swap observers. ``ModelVM`` and ``DualVM`` (which
    forwards to its model) offer it; test with ``isinstance(vm, ModelIntrospection)``."""

    @property
    def last_result(self) -> OpResult | None: ...

    def submit(self, region: MemoryRegion) -> OpResult: ...

    def describe_metadata(self, slot: MemorySlot) -> dict[str, Any]: ...

    def slot_metadata_bytes(self, slot: MemorySlot) -> tuple[int, int]: ...

    def metadata_bytes(self) -> int: ...

    def vmalloc_bytes(self) -> int: ...

    def allocations(self) -> list[Allocation]: ...

    def generation(self, as_id: int = 0) -> int: ...

    def check(self) -> list[str]: ...

    def add_observer(self, observer: Observer) -> None: ...

    def remove_observer(self, observer: Observer) -> None: ...


@runtime_checkable
class VmaWalker(Protocol):
    """A model whose arch may walk the process's VMAs (``ModelVM``): it answers from the VMAs
    it was told of, or reads them from a source as it walks (a differential backend sets
    the kernel's)."""

    @property
    def walks_vmas(self) -> bool: ...

    def tell_vmas(self, start: int, end: int, vmas: Iterable[Vma]) -> None: ...

    def set_vma_source(self, source: VmaReader | None) -> None: ...


@runtime_checkable
class VmaSource(Protocol):
    """A backend that can say which VMAs its kernel would walk over a range (``KvmVM``: this
    process's, from /proc/self/maps; ``ModelVM``: the ones it knows of). ``pfnmap=False``
    allows leaving ``VM_PFNMAP`` out where finding it costs more (/proc/self/smaps)."""

    def process_vmas(self, start: int, end: int, *, pfnmap: bool = True) -> list[Vma]: ...


@runtime_checkable
class FaultInjection(Protocol):
    """What the model alone can do, with no kernel counterpart: fail an allocation of its
    ``ledger`` and model a vCPU's write. ``ModelVM`` offers it; ``DualVM`` refuses it."""

    ledger: Ledger

    def inject_enomem(self, nth: int = 1, kind: str | None = None) -> None: ...

    def mark_page_dirty(self, gfn: int, as_id: int = 0) -> bool: ...
