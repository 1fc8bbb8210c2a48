"""Host profiles: everything that differs between the kernels and hosts the model can imitate.

A :class:`Profile` is plain data; :data:`PRESETS` holds the named ones and
:func:`memslot.detect_profile` builds one for the running kernel from /dev/kvm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .constants import KVM_DIRTY_GFN_SIZE, KVM_DIRTY_RING_MAX_ENTRIES, KVM_MEM_SLOTS_NUM

ARCHES = ("x86", "ppc-hv", "ppc-pr", "arm64", "riscv", "s390")

# KVM_DIRTY_RING_RSVD_ENTRIES (kvm_dirty_ring.h); x86 adds the PML buffer when PML is on.
DIRTY_RING_RSVD_ENTRIES = 64
PML_LOG_NR_ENTRIES = 512


@dataclass(frozen=True)
class Profile:
    """What a host's KVM looks like to the memslot code."""

    name: str
    arch: str
    description: str = ""
    kernel: str = "6.18"
    page_shift: int = 12
    nr_address_spaces: int = 1
    internal_mem_slots: int = 0
    readonly_mem: bool = True
    #: CONFIG_KVM_GUEST_MEMFD: ``KVM_MEM_GUEST_MEMFD`` is a valid flag (v2 ioctl only).
    guest_memfd: bool = False
    #: "Disallow toggling KVM_MEM_GUEST_MEMFD on an existing memslot" (6.18.y stable, 6.19).
    gmem_toggle_fix: bool = True
    #: access_ok limit (TASK_SIZE_MAX); ``None`` where access_ok accepts every address.
    user_addr_limit: int | None = 0x7FFFFFFFF000
    # -- x86 ------------------------------------------------------------------------------
    #: Two-dimensional paging (EPT/NPT). Without it KVM uses shadow paging.
    tdp: bool = False
    #: Host MAXPHYADDR, which bounds guest gfns under TDP (``kvm_mmu_max_gfn``).
    phys_bits: int = 52
    #: The TDP MMU with lazily allocated rmaps (``kvm_memslots_have_rmaps``).
    tdp_mmu: bool = False
    #: CONFIG_KVM_EXTERNAL_WRITE_TRACKING (KVMGT built in): write-track arrays always exist.
    external_write_tracking: bool = False
    #: An external page-track user (KVMGT) is attached to the VM: MOVE fails EINVAL.
    external_page_tracker: bool = False
    #: Dirty-ring entries reserved per vCPU beyond the generic 64 (x86 PML: 512).
    cpu_dirty_log_size: int = 0
    # -- arm64 / riscv ----------------------------------------------------------------------
    #: Guest physical address bits (arm64 IPA size, riscv G-stage GPA size).
    ipa_bits: int | None = None
    # -- s390 -------------------------------------------------------------------------------
    mem_limit: int | None = None
    ucontrol: bool = False
    protected: bool = False
    # -- ppc --------------------------------------------------------------------------------
    #: ``totalram_pages()`` for the PPC HV rmap size check.
    totalram_pages: int = 1 << 22
    # -- dirty logging ----------------------------------------------------------------------
    #: KVM_DIRTY_LOG_MANUAL_CAPS, 0 without KVM_GENERIC_DIRTYLOG_READ_PROTECT.
    manual_dirty_log_caps: int = 3
    dirty_ring_tso: bool = False
    dirty_ring_acq_rel: bool = False
    dirty_ring_with_bitmap: bool = False

    # -- derived ----------------------------------------------------------------------------
    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def user_mem_slots(self) -> int:
        """KVM_USER_MEM_SLOTS = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS."""
        return KVM_MEM_SLOTS_NUM - self.internal_mem_slots

    @property
    def max_gfn(self) -> int:
        """x86 ``kvm_mmu_max_gfn``: ``2^(B-12) - 1``, B = MAXPHYADDR under TDP, else 52."""
        bits = self.phys_bits if self.tdp else 52
        return (1 << (bits - self.page_shift)) - 1

    @property
    def dirty_ring_max_bytes(self) -> int:
        return KVM_DIRTY_RING_MAX_ENTRIES * KVM_DIRTY_GFN_SIZE

    @property
    def dirty_ring_rsvd_entries(self) -> int:
        return DIRTY_RING_RSVD_ENTRIES + self.cpu_dirty_log_size

    def replace(self, **changes: Any) -> Profile:
        """A copy with some fields changed (``name`` should change too)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["user_mem_slots"] = self.user_mem_slots
        if self.arch == "x86":
            out["max_gfn"] = self.max_gfn
        return out


_X86_COMMON: dict[str, Any] = dict(
    arch="x86",
    internal_mem_slots=3,  # APIC access page, identity page table, TSS (VMX)
    guest_memfd=True,
    user_addr_limit=0x7FFFFFFFF000,  # TASK_SIZE_MAX, 4-level paging
    dirty_ring_tso=True,
    dirty_ring_acq_rel=True,
)

PRESETS: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="x86_64",
            description="stock x86-64 host: TDP (EPT) with the TDP MMU and lazy rmaps, "
            "SMM (two address spaces), MAXPHYADDR 46, PML",
            nr_address_spaces=2,
            tdp=True,
            tdp_mmu=True,
            phys_bits=46,
            cpu_dirty_log_size=PML_LOG_NR_ENTRIES,
            **_X86_COMMON,
        ),
        Profile(
            name="x86_64-shadow",
            description="x86-64 with shadow paging and no SMM (one address space): rmaps and "
            "write-tracking for every slot, 52-bit gfn limit; the kind of host memslot's CI runs",
            nr_address_spaces=1,
            tdp=False,
            tdp_mmu=False,
            **_X86_COMMON,
        ),
        Profile(
            name="ppc64-hv",
            arch="ppc-hv",
            description="POWER book3s HV (64 KiB pages): one rmap entry per page, carried "
            "over on MOVE and FLAGS_ONLY; no read-only memory",
            page_shift=16,
            readonly_mem=False,
            user_addr_limit=1 << 52,  # TASK_SIZE_USER64 (4 PB)
            totalram_pages=1 << 20,  # 64 GiB of 64 KiB pages
            manual_dirty_log_caps=0,
        ),
        Profile(
            name="ppc64-pr",
            arch="ppc-pr",
            description="POWER book3s PR (64 KiB pages): no per-slot metadata",
            page_shift=16,
            readonly_mem=False,
            user_addr_limit=1 << 52,
            manual_dirty_log_caps=0,
        ),
        Profile(
            name="arm64",
            arch="arm64",
            description="arm64, 4 KiB pages, 40-bit IPA (default VM type): slots past the IPA "
            "size fail EFAULT",
            ipa_bits=40,
            guest_memfd=True,
            user_addr_limit=1 << 48,  # TASK_SIZE_MAX = 1 << VA_BITS
            dirty_ring_acq_rel=True,
            dirty_ring_with_bitmap=True,
        ),
        Profile(
            name="riscv64",
            arch="riscv",
            description="riscv64 Sv48 host, Sv48x4 G-stage (50-bit GPA): slots reaching the GPA "
            "size fail EFAULT",
            ipa_bits=50,
            user_addr_limit=1 << 47,
        ),
        Profile(
            name="s390x",
            arch="s390",
            description="s390x: 1 MiB aligned userspace_addr and size for CREATE/MOVE, "
            "mem_limit; no read-only memory",
            readonly_mem=False,
            internal_mem_slots=1,  # "KVM: s390: fake memslot for ucontrol VMs" (2025)
            user_addr_limit=None,
            mem_limit=(1 << 64) - 4096,  # TASK_SIZE_MAX when sclp reports no HAMAX
            manual_dirty_log_caps=0,
        ),
    )
}

DEFAULT_PROFILE = "x86_64"


def get_profile(profile: str | Profile) -> Profile:
    """A preset by name (``KeyError`` naming the presets otherwise), or the profile itself."""
    if isinstance(profile, Profile):
        return profile
    try:
        return PRESETS[profile]
    except KeyError:
        raise KeyError(
            f"unknown profile {profile!r}; presets: {', '.join(PRESETS)} (or 'detect')"
        ) from None
