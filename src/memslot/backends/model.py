"""``ModelVM``: the executable model of a KVM VM's memslots, behind the shared VM API."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .. import constants as c
from ..arch import make_arch
from ..engine import caps
from ..engine import gmem as gmem_files
from ..engine.change import (
    GMEM_CREATE,
    GMEM_UNSUPPORTED,
    OTHER_MM,
    VCPU_EXISTS,
    VCPU_ID,
    VCPU_MAX,
)
from ..engine.dirty_log import DirtyLog
from ..engine.ledger import Allocation, Ledger
from ..engine.memslots import Memslots, Observer
from ..engine.result import OpResult
from ..engine.slot import MemorySlot
from ..engine.vmas import ANON_RW, Vma, VmaMap, VmaReader, VmFlag
from ..errors import ClosedError, KvmError
from ..profile import DEFAULT_PROFILE, Profile, get_profile
from ..request import MemoryRegion
from .base import (
    KVM_HVA_ERR_BAD,
    KVM_HVA_ERR_RO_BAD,
    PAGE_OFFSET,
    U32,
    U64,
    VM,
    VmReferences,
    check_clear_dirty_log_args,
    check_enable_cap_args,
    check_host_range,
    check_region_fields,
    check_uint,
    kvm_is_error_hva,
)

_new = tuple.__new__  # NamedTuple construction without its Python-level __new__

class ModelVM(VM):
    """A VM whose memslots live in the model (no /dev/kvm needed).

    ``profile`` is a preset name (see ``memslot.PRESETS``) or a :class:`Profile`;
    ``variants`` switch on alternative kernel behaviours to study them (e.g.
    ``"x86-reuse-arch-on-move"``, ``"ppc-realloc-rmap-on-move"``).
    """

    def __init__(
        self, profile: str | Profile = DEFAULT_PROFILE, *, variants: Iterable[str] = ()
    ) -> None:
        self.profile = get_profile(profile)
        self.variants = frozenset(variants)
        self.ledger = Ledger(self.profile.page_size)
        self.arch = make_arch(self.profile, self.ledger, self.variants)
        self._m = Memslots(self.profile, self.arch, self.ledger)
        self._m.check_fields = check_region_fields
        self._dirty = DirtyLog(self._m)
        self._closed = False  # the VM fd
        self._destroyed = False  # kvm_destroy_vm ran
        self._mappings: list[tuple[int, int]] = []
        self._mapping_flags: list[VmFlag] = []  # the VMA each registration declared
        self._vcpu_ids: set[int] = set()  # every vCPU created (closing an fd destroys none)
        #: The ids handed out as asked (before a u32 truncation), for the default id.
        self._vcpu_handed: set[int] = set()
        self._vcpus: set[int] = set()  # vCPU fds still open
        #: The record of the most recent memslot request.
        self.last_result: OpResult | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{sum(len(s) for s in self._m.sets)} slots"
        return f"<ModelVM {self.profile.name} {state}>"

    def _live(self) -> Memslots:
        if self._closed:
            raise ClosedError("this ModelVM is closed")
        return self._m

    def _ioctl(self) -> Memslots:
        """The engine, for a call that is a VM ioctl in the kernel: refused with EIO from a
        forked child (``kvm_vm_ioctl``: ``kvm->mm != current->mm``)."""
        if self._closed:
            raise ClosedError("this ModelVM is closed")
        if self._m.foreign_caller:
            raise KvmError(OTHER_MM.errno, str(OTHER_MM),
                           f"VM created by pid {self._m.creator_pid}, called from a fork")
        return self._m

    # -- requests -------------------------------------------------------------------------
    def submit(self, region: MemoryRegion) -> OpResult:
        """Apply a request and return its record (a refusal is ``result.errno``, not raised)."""
        if self._closed:
            check_region_fields(region)  # a bad field is reported before the closed VM
            raise ClosedError("this ModelVM is closed")
        # (the engine checks the fields, the common request in compiled code)
        result = self.last_result = self._m.submit(region)
        return result

    def apply(self, region: MemoryRegion) -> None:
        result = self.submit(region)
        if result.errno:
            raise _error(result)

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        # The hot path of the shared API, without the generic wrapper layers.
        region = _new(MemoryRegion, (slot, flags, guest_phys_addr, memory_size, userspace_addr,
                                     0, None))
        if self._closed:
            check_region_fields(region)
            raise ClosedError("this ModelVM is closed")
        result = self.last_result = self._m.submit(region)
        if result.errno:
            raise _error(result)

    def set_internal_memory_region(
        self, slot_id: int, guest_phys_addr: int, memory_size: int, userspace_addr: int = 0,
        as_id: int = 0,
    ) -> None:
        """An in-kernel memslot (x86 ``__x86_set_memory_region``: APIC access page, identity
        page table, TSS; ids ``KVM_USER_MEM_SLOTS..KVM_MEM_SLOTS_NUM-1``)."""
        p = self.profile
        if not p.user_mem_slots <= slot_id < p.mem_slots_num:
            raise ValueError(f"internal slot ids are {p.user_mem_slots}.."
                             f"{p.mem_slots_num - 1} on {p.name}")
        region = MemoryRegion((as_id << 16) | slot_id, 0, guest_phys_addr, memory_size,
                              userspace_addr)
        check_region_fields(region)
        result = self._live().set_memory_region(region, internal=True)
        self.last_result = result
        if result.errno:
            raise _error(result)

    @property
    def page_size(self) -> int:
        """The profile's ``PAGE_SIZE``."""
        return self.profile.page_size

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        check_uint("size", size, U64)
        check_uint("flags", flags, U64)
        m = self._ioctl()
        what = f"KVM_CREATE_GUEST_MEMFD size={size:#x} flags={flags:#x}"
        p = self.profile
        if not p.guest_memfd_ioctl:
            # kvm_arch_vm_ioctl's default: ENOTTY, EINVAL on arm64 and riscv.
            raise KvmError(p.unknown_ioctl_errno, str(GMEM_UNSUPPORTED), what)
        # kvm_gmem_create: supported flags, then a positive, page-aligned loff_t size (a u64
        # of 2^63 or more is negative there).
        valid = p.guest_memfd_flags or 0
        if flags & ~valid or not 0 < size < 1 << 63 or size & (p.page_size - 1):
            raise KvmError(GMEM_CREATE.errno, str(GMEM_CREATE), what)
        g = gmem_files.create(size, flags, m)
        m.gmem_files[g.fd] = g
        return g.fd

    def close_guest_memfd(self, fd: int) -> None:
        """Close a guest_memfd made by :meth:`create_guest_memfd` (``kvm_gmem_release``:
        its bindings become invalid; the VM loses a reference)."""
        m = self._held()
        g = m.gmem_files.pop(fd, None) if isinstance(fd, int) else None
        if g is None:
            raise ValueError(f"fd {fd} is not a guest_memfd of this VM")
        gmem_files.close(g)
        self._release()

    # -- capabilities ---------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        check_uint("cap", cap, U64)
        self._ioctl()
        return _answer(caps.check_extension(self.profile, cap), cap)

    def check_system_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on ``/dev/kvm`` (no mm check: a system ioctl)."""
        check_uint("cap", cap, U64)
        self._live()
        return _answer(caps.check_extension(self.profile, cap, on_vm=False), cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        check_enable_cap_args(cap, args, flags)
        self._ioctl()
        if self._dirty.enable_cap(cap, tuple(args), flags):
            return
        # kvm_vm_ioctl_enable_cap_generic's default: the arch's kvm_vm_ioctl_enable_cap
        rule = self.arch.enable_cap(cap, tuple(args), flags, self._dirty.created_vcpus)
        if rule is not None:
            raise KvmError(rule.errno, str(rule), f"KVM_ENABLE_CAP cap={cap}")

    def create_vcpu(self, vcpu_id: int | None = None) -> int:
        """Count a vCPU (the model runs none; the dirty ring can no longer be enabled)."""
        if vcpu_id is not None:
            check_uint("vcpu_id", vcpu_id, U64)
        self._ioctl()
        if vcpu_id is None:
            # As KvmVM: the lowest id this VM has not handed out.
            vcpu_id = next(i for i in range(len(self._vcpu_handed) + 1)
                           if i not in self._vcpu_handed)
        requested = vcpu_id
        if self.profile.vcpu_id_u32:
            vcpu_id &= 0xFFFFFFFF  # kvm_vm_ioctl_create_vcpu(struct kvm *, u32 id)
        what = f"KVM_CREATE_VCPU id={vcpu_id}"
        # kvm_vm_ioctl_create_vcpu: the id limit, kvm->max_vcpus, then a duplicate id before
        # the arch hooks (7.3) or after them.
        if vcpu_id >= self.profile.max_vcpu_ids:
            raise KvmError(VCPU_ID.errno, str(VCPU_ID), what)
        if self._dirty.created_vcpus >= self.profile.max_vcpus:
            raise KvmError(VCPU_MAX.errno, str(VCPU_MAX), what)
        if self.profile.vcpu_exists_first and vcpu_id in self._vcpu_ids:
            raise KvmError(VCPU_EXISTS.errno, str(VCPU_EXISTS), what)
        arch_rule = self.arch.vcpu_create(vcpu_id, frozenset(self._vcpu_ids))
        if arch_rule is not None:
            raise KvmError(arch_rule.errno, str(arch_rule), what)
        if vcpu_id in self._vcpu_ids:
            raise KvmError(VCPU_EXISTS.errno, str(VCPU_EXISTS), what)
        self._vcpu_ids.add(vcpu_id)
        self._vcpus.add(requested)
        self._vcpu_handed.add(requested)
        self._dirty.created_vcpus += 1
        return requested

    def close_vcpu(self, vcpu_id: int) -> None:
        """Close a vCPU fd made by :meth:`create_vcpu` (``kvm_vcpu_release``: the vCPU lives
        on until the VM is destroyed; the VM loses a reference)."""
        self._held()
        if vcpu_id not in self._vcpus:
            raise ValueError(f"vCPU {vcpu_id} was not created by create_vcpu()")
        self._vcpus.discard(vcpu_id)
        self._release()

    def first_shadow_root(self) -> None:
        """x86 with lazy rmaps: the first shadow root allocates rmaps and write tracking for
        every slot (``mmu_first_shadow_root_alloc``). Idempotent; no-op elsewhere."""
        m = self._live()
        with m.slots_lock:
            self.ledger.begin()
            updated = self.arch.on_vm_event("shadow_root", m.all_slots())
            m.replace_slots(updated)

    # -- dirty logging --------------------------------------------------------------------
    def get_dirty_log(self, slot: int) -> bytes:
        check_uint("slot", slot, U32)
        self._ioctl()
        return self._dirty.get(slot)

    def clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, bitmap: bytes | None
    ) -> None:
        check_clear_dirty_log_args(slot, first_page, num_pages)
        self._ioctl()
        self._dirty.clear(slot, first_page, num_pages, bitmap)

    def mark_page_dirty(self, gfn: int, as_id: int = 0) -> bool:
        """Model a vCPU's write to ``gfn`` (``mark_page_dirty``); True if it was logged."""
        self._live()
        return self._dirty.mark_page_dirty(gfn, as_id)

    @property
    def dirty_ring(self) -> list[tuple[int, int]]:
        """Entries pushed to the dirty ring (``(slot field, page offset)``)."""
        return list(self._dirty.ring)

    # -- slots and lookups ----------------------------------------------------------------
    @property
    def nr_address_spaces(self) -> int:
        return self.profile.nr_address_spaces

    def _as(self, as_id: int) -> int:
        if not 0 <= as_id < self._m.nr_as:
            raise ValueError(f"address space {as_id} does not exist "
                             f"({self.profile.name} has {self._m.nr_as})")
        return as_id

    def memslots(self, as_id: int = 0) -> list[MemorySlot]:
        return self._live().ordered(self._as(as_id))

    def memslot(self, slot_id: int, as_id: int = 0) -> MemorySlot | None:
        """The slot with this id (``id_to_memslot``)."""
        return self._live().by_id(self._as(as_id), slot_id)

    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> MemorySlot | None:
        return self._live().find(gfn, self._as(as_id))

    def gfn_to_hva(self, gfn: int, as_id: int = 0, write: bool = False) -> int:
        """``__gfn_to_hva_many``: the host address, or ``KVM_HVA_ERR_BAD`` (no slot, or an
        INVALID slot mid-update) or ``KVM_HVA_ERR_RO_BAD`` (write to a READONLY slot). Test
        the result with :func:`kvm_is_error_hva`, as KVM does."""
        slot = self.gfn_to_memslot(gfn, as_id)
        if slot is None or slot.flags & c.KVM_MEMSLOT_INVALID:
            return KVM_HVA_ERR_BAD
        if write and slot.flags & c.KVM_MEM_READONLY:
            return KVM_HVA_ERR_RO_BAD
        return slot.userspace_addr + ((gfn - slot.base_gfn) << self.profile.page_shift)

    def hva_to_memslots(self, hva: int) -> list[MemorySlot]:
        """Slots of every address space whose host range contains ``hva`` (the MMU
        notifier's interval-tree walk)."""
        return self._live().hva_lookup(hva)

    def generation(self, as_id: int = 0) -> int:
        """The address space's memslot generation (bit 63 set while a swap is in flight)."""
        return self._live().sets[self._as(as_id)].generation

    @property
    def nr_memslot_pages(self) -> int:
        return self._live().nr_memslot_pages

    # -- host memory ----------------------------------------------------------------------
    def register_host_mapping(
        self, addr: int, size: int, *, writable: bool = True, pfnmap: bool = False
    ) -> None:
        """Record ``[addr, addr + size)`` as memory mapped for the guest, and as one VMA of
        the process (read-write unless ``writable=False``; ``pfnmap``: IO memory) that the
        arch's VMA walk sees (the model runs no vCPU, so the record is all there is)."""
        self._live()
        check_host_range(addr, size)
        flags = ANON_RW if writable else VmFlag.READ
        if pfnmap:
            flags |= VmFlag.PFNMAP | VmFlag.SHARED
        self._mappings.append((addr, size))
        self._mapping_flags.append(flags)
        self.arch.vmas.map(addr, addr + size, flags)

    def unregister_host_mapping(self, addr: int, size: int) -> None:
        """Withdraw a registration; its range is unmapped to the model unless another
        registration still covers part of it."""
        self._live()
        try:
            index = self._mappings.index((addr, size))
        except ValueError:
            raise ValueError(f"{addr:#x}+{size:#x} was not registered") from None
        del self._mappings[index]
        del self._mapping_flags[index]
        vmas = self.arch.vmas
        vmas.forget(addr, addr + size)
        for (start, length), flags in zip(self._mappings, self._mapping_flags, strict=True):
            lo, hi = max(start, addr), min(start + length, addr + size)
            if lo < hi:
                vmas.map(lo, hi, flags)

    def host_mappings(self) -> list[tuple[int, int]]:
        self._live()
        return list(self._mappings)

    # -- the process's VMAs ---------------------------------------------------------------
    @property
    def walks_vmas(self) -> bool:
        """Whether this arch's ``kvm_arch_prepare_memory_region`` walks the VMAs of a slot's
        host range (arm64, riscv): then its answers depend on :meth:`tell_vmas`."""
        return self.arch.walks_vmas

    @property
    def vmas(self) -> VmaMap:
        """The process's VMAs as far as the model knows (registered host mappings and what
        :meth:`tell_vmas` said); every other address is unmapped to the model."""
        return self.arch.vmas

    def tell_vmas(self, start: int, end: int, vmas: Iterable[Vma]) -> None:
        """The process's VMAs over ``[start, end)`` are exactly ``vmas`` (e.g. a real
        process's, from /proc/self/maps: what ``find_vma_intersection`` would walk)."""
        self._live()
        self.arch.vmas.replace(start, end, vmas)

    def set_vma_source(self, source: VmaReader | None) -> None:
        """Have the arch walks read the VMAs they walk from ``source`` (a real process's:
        what ``find_vma_intersection`` would find in ``current->mm``), each time one walks;
        ``None``: the known VMAs only."""
        if source is not None:
            self._live()
        self.arch.vmas.source = source

    def process_vmas(self, start: int, end: int, *, pfnmap: bool = True) -> list[Vma]:
        """The known VMAs meeting ``[start, end)``, in address order (``pfnmap`` is moot:
        the model always knows)."""
        self._live()
        return self.arch.vmas.intersecting(start, end)

    # -- observers ------------------------------------------------------------------------
    def add_observer(self, observer: Observer) -> None:
        """Call ``observer(SwapEvent)`` at every swap (lookups inside it see the new set)."""
        self._live().observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        self._m.observers.remove(observer)

    # -- metadata -------------------------------------------------------------------------
    def metadata_bytes(self) -> int:
        """Exact bytes of every live memslot allocation, slot structs included."""
        return self.ledger.live_bytes

    def vmalloc_bytes(self) -> int:
        """What /proc/meminfo VmallocUsed accounts for the live vmalloc'd arrays."""
        return self.ledger.vmalloc_bytes

    def allocations(self) -> list[Allocation]:
        """Live ledger entries, oldest first."""
        return sorted(self.ledger, key=lambda a: a.serial)

    def slot_metadata_bytes(self, slot: MemorySlot) -> tuple[int, int]:
        """``(bytes, vmalloc_bytes)`` of one slot's allocations: the totals of
        :meth:`describe_metadata` from the ledger groups the slot holds, without building the
        per-array description (a final table of 32,764 slots asks this of each)."""
        total = vmalloc = 0
        if slot.struct is not None:
            total = slot.struct.bytes
        for group in self.arch.groups(slot.arch):
            total += group.bytes
            vmalloc += group.vmalloc_bytes
        bitmap = slot.dirty_bitmap
        if bitmap is not None and bitmap.alloc is not None:
            total += bitmap.alloc.bytes
            vmalloc += bitmap.alloc.vmalloc_bytes
        return total, vmalloc

    def describe_metadata(self, slot: MemorySlot) -> dict[str, Any]:
        """Per-array entries and bytes and large-page facts of one slot."""
        out = self.arch.describe(slot)
        arrays = list(out.get("arrays", []))
        if slot.struct is not None:
            arrays.insert(0, {"array": "slot", "entries": 1, "bytes": slot.struct.bytes,
                              "vmalloc_bytes": 0})
        if slot.dirty_bitmap is not None and slot.dirty_bitmap.alloc is not None:
            a = slot.dirty_bitmap.alloc.items[0]
            arrays.append({"array": "dirty_bitmap", "entries": a.entries * a.entry_size * 8,
                           "bytes": a.bytes, "vmalloc_bytes": a.vmalloc_bytes})
        out["arrays"] = arrays
        out["bytes"] = sum(a["bytes"] for a in arrays)
        out["vmalloc_bytes"] = sum(a["vmalloc_bytes"] for a in arrays)
        return out

    def huge_ranges(self, slot: MemorySlot) -> dict[str, list[tuple[int, int]]]:
        """Per huge-page size, the gfn ranges of ``slot`` KVM may map huge."""
        return self.arch.huge_ranges(slot)

    # -- faults and integrity -------------------------------------------------------------
    def inject_enomem(self, nth: int = 1, kind: str | None = None) -> None:
        """Make the ``nth`` allocation from now (of ``kind`` only, when given) fail once."""
        self._live()
        self.ledger.inject_enomem(nth, kind)

    def check(self) -> list[str]:
        """Every invariant violation found (empty when the state is one the kernel could be
        in): order and overlap, indexes, metadata shapes, ledger vs live slots, accounting,
        generations (:meth:`Memslots.check`, which asks each structure)."""
        return self._m.check()

    # -- lifetime -------------------------------------------------------------------------
    def sibling(self, vm_type: int = 0) -> ModelVM:
        return ModelVM(self.profile, variants=self.variants)

    def close(self) -> None:
        """Close the VM fd and every guest_memfd and vCPU this VM made: the last reference
        goes and ``kvm_destroy_vm`` frees every slot. Idempotent."""
        self._closed = True
        for g in list(self._m.gmem_files.values()):
            gmem_files.close(g)
        self._m.gmem_files.clear()
        self._vcpus.clear()
        self._mappings.clear()
        self._mapping_flags.clear()
        self._release()

    def close_vm_fd(self) -> None:
        """Close only the VM fd (``kvm_vm_release``): open guest_memfds and vCPU fds keep
        the VM, its slots and their metadata alive until they are closed too."""
        self._closed = True
        self._release()

    def references(self) -> VmReferences:
        """What holds the VM (``kvm->users_count``): its fd, guest_memfds, vCPU fds."""
        self._prune_gmem()
        return VmReferences(not self._closed, tuple(sorted(self._m.gmem_files)),
                            tuple(sorted(self._vcpus)))

    def _held(self) -> Memslots:
        """The engine while anything references the VM (closing a guest_memfd or vCPU is
        allowed after the VM fd is closed)."""
        if self._destroyed:
            raise ClosedError("this ModelVM was destroyed (every reference is closed)")
        return self._m

    def _prune_gmem(self) -> None:
        """Forget guest_memfds closed behind the model's back (``os.close``)."""
        for fd, g in list(self._m.gmem_files.items()):
            if gmem_files.lookup(fd) is not g:
                del self._m.gmem_files[fd]

    def _release(self) -> None:
        """``kvm_put_kvm``: destroy the VM once nothing references it."""
        self._prune_gmem()
        if self._destroyed or not self._closed or self._m.gmem_files or self._vcpus:
            return
        self._destroyed = True
        self._m.free_all()

    @property
    def closed(self) -> bool:
        return self._closed


__all__ = [
    "KVM_HVA_ERR_BAD",
    "KVM_HVA_ERR_RO_BAD",
    "MEMSLOT_CAPABILITIES",
    "PAGE_OFFSET",
    "ModelVM",
    "extension_value",
    "kvm_is_error_hva",
]


def _error(result: OpResult) -> KvmError:
    rule = result.rule
    text = str(rule) if rule is not None else ""
    if result.detail:
        text += f" ({result.detail})"
    return KvmError(result.errno, text, result.request.describe())


def _answer(value: int, cap: int) -> int:
    """``KVM_CHECK_EXTENSION`` returns the arch's ``r``: a negative one is the ioctl's
    ``-errno`` (arm64 answers -EINVAL for KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED on /dev/kvm)."""
    if value < 0:
        raise KvmError(-value, "kvm_vm_ioctl_check_extension: the arch refuses to answer",
                       f"KVM_CHECK_EXTENSION {cap}")
    return value


#: The capabilities the model derives from its profile (see ``engine.caps``).
MEMSLOT_CAPABILITIES = tuple(sorted(caps.DERIVED))


def extension_value(profile: Profile, cap: int) -> int:
    """What ``KVM_CHECK_EXTENSION`` on a VM fd answers for ``cap`` under ``profile``."""
    return caps.check_extension(profile, cap)
