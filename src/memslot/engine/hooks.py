"""The arch hooks the generic engine calls, as in kvm_main.c: ``kvm_arch_prepare_memory_region``,
``kvm_arch_commit_memory_region`` and ``kvm_arch_free_memslot``; plus what the model adds:
a description of each slot's metadata and integrity checks for it."""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import Any, ClassVar

from ..profile import Profile
from .change import ENABLE_CAP_UNKNOWN, ChangeType, Rule
from .ledger import Allocation, AllocGroup, Ledger
from .slot import MemorySlot
from .vmas import VmaMap


def table_block_sizes(page_shift: int, levels: int = 2) -> tuple[int, ...]:
    """Block sizes of a radix page table with 8-byte entries, smallest first: each level
    maps ``2^(page_shift - 3)`` times the one below (4 KiB pages: 2M, 1G; 16 KiB: 32M, 64G;
    64 KiB: 512M, 4T)."""
    per = page_shift - 3
    return tuple(1 << (page_shift + per * k) for k in range(1, levels + 1))


class PrepareError(Exception):
    """An arch prepare step refused the change (carries the rule and its errno)."""

    def __init__(self, rule: Rule, detail: str = "") -> None:
        super().__init__(str(rule))
        self.rule = rule
        self.detail = detail


class ArchHooks:
    """Hooks of an arch with no per-slot metadata and no extra checks (PPC PR, mips)."""

    #: Variant names this arch understands (see ``ModelVM(variants=...)``).
    VARIANTS: ClassVar[tuple[str, ...]] = ()

    # -- arch facts the generic code and the tools read (class attributes) ------------------
    #: Where the arch's ``kvm_arch_prepare_memory_region`` and ``kvm_vm_ioctl_enable_cap``
    #: live in the kernel tree.
    source_file: ClassVar[str] = "arch/*/kvm"
    #: ``sizeof(struct kvm_arch_memory_slot)`` on a 64-bit kernel: the arch part of every
    #: ``struct kvm_memory_slot`` (its arrays are allocated separately).
    slot_arch_struct_bytes: ClassVar[int] = 0
    #: ``untagged_addr()`` strips a pointer tag here (arm64 top-byte ignore), so
    #: ``kvm_set_memory_region`` refuses a ``userspace_addr`` with bits 56..63 set.
    tagged_user_addresses: ClassVar[bool] = False
    #: The per-slot structure that decides which gfns may be mapped huge (x86
    #: ``lpage_info``), or ``None`` where the arch decides at fault time and the tools can
    #: only estimate from the gpa/hva alignment rule.
    huge_page_tracking: ClassVar[str | None] = None
    #: What ``kvm_arch_vm_ioctl`` answers for an ioctl it does not know (REGION2 before 6.8,
    #: KVM_CREATE_GUEST_MEMFD without guest_memfd): ENOTTY, EINVAL on arm64 and riscv.
    unknown_vm_ioctl_errno: ClassVar[int] = errno.ENOTTY
    #: Slots KVM keeps for itself beside the user ones (``KVM_PRIVATE_MEM_SLOTS``, later
    #: ``KVM_INTERNAL_MEM_SLOTS``) on every kernel of the arch: x86's APIC access page,
    #: identity page table and TSS.
    private_mem_slots: ClassVar[int] = 0
    #: The name of the VM-wide guest physical space that bounds slots (arm64 "IPA", riscv
    #: "G-stage GPA"), sized by ``Profile.ipa_bits``; ``None`` where there is none.
    guest_addr_space: ClassVar[str | None] = None
    #: x86's ``kvm_mmu_max_gfn()``: gfns are bounded by the host MAXPHYADDR under TDP
    #: (refused past it from 5.18), and the TDP / TDP-MMU module parameters apply.
    mmu_max_gfn: ClassVar[bool] = False
    #: ``KVM_CHECK_EXTENSION`` numbers only this arch answers that ``detect_profile()``
    #: records as profile fields (x86 KVM_CAP_VM_TYPES, arm64 KVM_CAP_ARM_VM_IPA_SIZE).
    arch_caps: ClassVar[frozenset[int]] = frozenset()
    #: ``kvm_arch_prepare_memory_region`` walks the VMAs of the slot's host range (arm64,
    #: riscv), so its answer depends on the process's mappings (:attr:`vmas`).
    walks_vmas: ClassVar[bool] = False
    #: The capabilities the arch's ``kvm_vm_ioctl_enable_cap`` accepts in the model (the
    #: fuzzer sends them; the rest of the arch's are refused).
    enable_caps: ClassVar[frozenset[int]] = frozenset()

    # -- arch facts that depend on the profile (class methods: no VM needed) ----------------
    @classmethod
    def huge_page_sizes(cls, page_shift: int) -> tuple[int, ...]:
        """The mapping sizes above the base page the arch's MMU can give a slot's gfns,
        smallest first (x86: the ``lpage_info`` levels; arm64, riscv: stage-2 PMD and PUD
        blocks); empty where guest memory is mapped at the base page size only."""
        return ()

    @classmethod
    def gfn_limit(cls, profile: Profile) -> int | None:
        """One past the last gfn a slot may cover by the arch's own bound (x86
        ``kvm_mmu_max_gfn() + 1``, also in versions that do not refuse past it; the arm64
        IPA and riscv G-stage sizes), or ``None`` where the arch sets none."""
        return None

    @classmethod
    def gpa_limit_text(cls, profile: Profile) -> str:
        """That bound in a few words, for listings (``-`` without one)."""
        return "-"

    def __init__(self, profile: Profile, ledger: Ledger, variants: frozenset[str]) -> None:
        self.profile = profile
        self.ledger = ledger
        self.variants = variants
        #: The host process's VMAs as far as the model was told (empty: all unmapped).
        self.vmas = VmaMap()

    # -- kernel hooks ---------------------------------------------------------------------
    def prepare(self, change: ChangeType, old: MemorySlot | None, new: MemorySlot | None) -> Any:
        """``kvm_arch_prepare_memory_region``: return the new slot's arch data or raise
        :class:`PrepareError`; anything allocated before a failure is freed first. ``new`` is
        the slot being prepared (its ``arch`` and ``dirty_bitmap`` not yet filled in), or
        ``None`` for DELETE, as in the kernel."""
        return None

    def vcpu_create(self, vcpu_id: int, existing: frozenset[int]) -> Rule | None:
        """``kvm_arch_vcpu_create``: the rule refusing vCPU ``vcpu_id`` (``existing`` are the
        ids made so far), or ``None``. It runs before the generic duplicate-id EEXIST of
        ``kvm_vm_ioctl_create_vcpu`` until 7.2 (``Profile.vcpu_exists_first``), after it from
        7.3."""
        return None

    def enable_cap(self, cap: int, args: tuple[int, ...], flags: int,
                   created_vcpus: int) -> Rule | None:
        """``kvm_vm_ioctl_enable_cap``, for a capability the generic code does not own: the
        rule refusing it, or ``None`` once applied. Here: none can be enabled (EINVAL)."""
        return ENABLE_CAP_UNKNOWN

    def commit(self, change: ChangeType, old: MemorySlot | None, new: MemorySlot | None) -> None:
        """``kvm_arch_commit_memory_region``."""

    def free(self, slot: MemorySlot) -> None:
        """``kvm_arch_free_memslot``: release ``slot``'s arch arrays."""

    # -- model extras -----------------------------------------------------------------------
    def groups(self, arch: Any) -> tuple[AllocGroup, ...]:
        """The ledger groups an arch-data object holds."""
        return ()

    def allocations(self, arch: Any) -> Iterable[Allocation]:
        """The individual allocations an arch-data object holds."""
        return ()

    def check_slot(self, slot: MemorySlot) -> list[str]:
        """Problems with ``slot``'s metadata (empty when its shapes fit the slot)."""
        return []

    def describe(self, slot: MemorySlot) -> dict[str, Any]:
        """Per-array entries and bytes, and large-page facts, as plain data."""
        return {}

    def huge_ranges(self, slot: MemorySlot) -> dict[str, list[tuple[int, int]]]:
        """Per large-page size, the gfn ranges ``[start, end)`` that may be mapped huge."""
        return {}

    def on_vm_event(self, event: str, slots: Iterable[MemorySlot]) -> list[MemorySlot]:
        """Arch reaction to a VM-wide event (x86: first shadow root); returns replaced slots."""
        return []
