"""Host profiles: everything that differs between the kernels and hosts the model can imitate.

A :class:`Profile` is plain data: the kernel version it models and every fact the engine and
the arch hooks read (limits, rules present in that version, allocation policies,
capabilities). :data:`PRESETS` holds the named ones, ``ARCH[-KIND]@X.Y`` (``x86_64@6.1``,
``x86_64-shadow@5.10``, ``arm64-16k@7.2``, ``ppc64-hv@6.12``), each modelled on a real
kernel (Debian's, as the kernel lab boots it); the names without a version (``x86_64``,
``arm64``, ...) are the newest of their kind. :func:`memslot.detect_profile` builds one for
the running kernel from /dev/kvm. The facts by version are in :mod:`memslot.versions`.
"""

from __future__ import annotations

import dataclasses
import errno
from dataclasses import dataclass
from typing import Any

from .constants import KVM_DIRTY_GFN_SIZE, KVM_DIRTY_RING_MAX_ENTRIES, KVM_MEM_SLOTS_NUM
from .versions import at_least, since, version_tuple

ARCHES = ("x86", "ppc-hv", "ppc-pr", "arm64", "riscv", "s390")

# KVM_DIRTY_RING_RSVD_ENTRIES (kvm_dirty_ring.h); x86 adds the PML buffer when PML is on.
DIRTY_RING_RSVD_ENTRIES = 64
PML_LOG_NR_ENTRIES = 512
# guest_memfd creation flags (uapi): GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED.
GMEM_FLAGS_ALL = 0x3


@dataclass(frozen=True)
class Profile:
    """What a host's KVM looks like to the memslot code."""

    name: str
    arch: str
    description: str = ""
    #: The kernel version modelled, ``"X.Y"``.
    kernel: str = "6.18"
    #: Whose build of that version: ``"debian"`` (the lab's kernels, Debian's config) or
    #: ``"custom"`` (a config of its own: versions of another build do not predict it).
    build: str = "debian"
    #: The VM type (``KVM_CREATE_VM`` argument) the profile describes.
    vm_type: str = "default"
    page_shift: int = 12
    nr_address_spaces: int = 1
    #: KVM_MEM_SLOTS_NUM: SHRT_MAX since 5.12; before, 512 on x86/arm64/ppc, 32 on s390.
    mem_slots_num: int = KVM_MEM_SLOTS_NUM
    internal_mem_slots: int = 0
    readonly_mem: bool = True
    #: KVM_SET_USER_MEMORY_REGION2 exists (6.8); before, the ioctl is unknown.
    user_memory2: bool = True
    #: What ``kvm_arch_vm_ioctl`` answers for an ioctl it does not know (REGION2 before 6.8,
    #: KVM_CREATE_GUEST_MEMFD without guest_memfd): ENOTTY, EINVAL on arm64 and riscv.
    unknown_ioctl_errno: int = errno.ENOTTY
    #: ``KVM_MEM_GUEST_MEMFD`` is a valid flag on this VM (v2 ioctl only).
    guest_memfd: bool = False
    #: KVM_CREATE_GUEST_MEMFD exists (``None``: exactly when ``guest_memfd``); on Debian's x86
    #: before 6.18 (from 6.12 at least: CONFIG_KVM_PRIVATE_MEM, selected by KVM_AMD_SEV) it
    #: exists while the default VM refuses the flag.
    guest_memfd_ioctl: bool | None = None
    #: Creation flags KVM_CREATE_GUEST_MEMFD accepts (``None``: MMAP|INIT_SHARED when the
    #: ioctl exists; 0 before the guest_memfd mmap series).
    guest_memfd_flags: int | None = None
    #: ``kvm_gmem_bind`` computes ``offset + size`` in signed ``loff_t``, so a range reaching
    #: 2^63 wraps negative and passes (seen on 6.18; 7.2 computes in ``uoff_t`` and refuses
    #: it). ``None``: by version.
    gmem_bind_wraps: bool | None = None
    #: ``kvm_gmem_bind`` answers EEXIST for a file range already bound to another slot
    #: (7.2; EINVAL on 6.18). ``None``: by version.
    gmem_bind_eexist: bool | None = None
    #: "Disallow toggling KVM_MEM_GUEST_MEMFD on an existing memslot" (6.18.y stable, 6.19).
    gmem_toggle_fix: bool = True
    #: KVM_CAP_MEMORY_ATTRIBUTES on this VM (0 for VMs without private memory).
    memory_attributes: int = 0
    #: KVM_CAP_MEMORY_ATTRIBUTES on /dev/kvm: ``kvm_supported_mem_attributes(NULL)`` answers
    #: KVM_MEMORY_ATTRIBUTE_PRIVATE (8) wherever CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES is built.
    memory_attributes_system: int = 0
    #: KVM_CAP_VM_TYPES (x86 bitmap of supported VM types; 0 elsewhere).
    vm_types: int = 0
    #: access_ok limit (TASK_SIZE_MAX); ``None`` where access_ok accepts every address.
    user_addr_limit: int | None = 0x7FFFFFFFF000
    #: powerpc64's access_ok from 7.2 (a power-of-two TASK_SIZE_MAX): address and size must
    #: each be below the limit, their sum may pass it; elsewhere ``uaddr + size <= limit``.
    access_ok_mask: bool = False
    # -- x86 ------------------------------------------------------------------------------
    #: Two-dimensional paging (EPT/NPT). Without it KVM uses shadow paging.
    tdp: bool = False
    #: Host MAXPHYADDR, which bounds guest gfns under TDP (``kvm_mmu_max_gfn``).
    phys_bits: int = 52
    #: ``kvm_arch_prepare_memory_region`` refuses a last gfn above ``kvm_mmu_max_gfn()`` (5.18).
    max_gfn_check: bool = True
    #: The TDP MMU with lazily allocated rmaps (``kvm_memslots_have_rmaps``, 5.14).
    tdp_mmu: bool = False
    #: Write-track arrays exist for every slot: always before 5.16, with
    #: CONFIG_KVM_EXTERNAL_WRITE_TRACKING (Debian's KVMGT build) 5.16..6.8.
    external_write_tracking: bool = False
    #: An external page-track user (KVMGT) is attached to the VM: MOVE fails EINVAL.
    external_page_tracker: bool = False
    #: x86 MOVE allocates rmap/lpage_info for the new base (5.7); before, the old arrays stay.
    move_reallocates_arch: bool = True
    #: Dirty-ring entries reserved per vCPU beyond the generic 64 (x86 PML: 512).
    cpu_dirty_log_size: int = 0
    # -- arm64 / riscv ----------------------------------------------------------------------
    #: Guest physical address bits of this VM (arm64 IPA size, riscv G-stage GPA size).
    ipa_bits: int | None = None
    #: arm64 KVM_CAP_ARM_VM_IPA_SIZE: the largest IPA size a VM type may ask for.
    ipa_limit: int | None = None
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
    # -- vCPUs and other capabilities --------------------------------------------------------
    #: KVM_CAP_NR_VCPUS: ``min(num_online_cpus(), KVM_MAX_VCPUS)`` (presets: an 8-CPU host).
    nr_vcpus: int = 8
    #: KVM_CAP_MAX_VCPUS (``KVM_MAX_VCPUS``; ``kvm->max_vcpus`` of a new VM).
    max_vcpus: int = 1024
    #: ``KVM_MAX_VCPU_IDS``: vCPU ids must be below it.
    max_vcpu_ids: int = 4096
    #: The arch answers KVM_CAP_MAX_VCPU_ID (with ``max_vcpu_ids``); riscv does not (0).
    max_vcpu_id_cap: bool = True
    #: ``kvm_vm_ioctl_create_vcpu`` takes a ``u32`` id, so KVM_CREATE_VCPU's argument is
    #: truncated (id 2^32 is vCPU 0) until "KVM: Reject overly excessive IDs in
    #: KVM_CREATE_VCPU" made it ``unsigned long`` in 6.11 (the lab's 5.10 truncates;
    #: detect_profile() probes it).
    vcpu_id_u32: bool = False
    #: ``kvm_vm_ioctl_create_vcpu`` refuses a taken id (EEXIST) before the arch hooks run
    #: (7.3); before, the arch's refusal (ppc64 HV: a taken vcore, EINVAL) came first.
    vcpu_exists_first: bool = False
    #: ``KVM_CHECK_EXTENSION`` answers the model does not derive, as ``(cap, VM fd answer,
    #: /dev/kvm answer)``, a negative answer being the ioctl's ``-errno``:
    #: ``detect_profile()`` records them; presets state none (0).
    extensions: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        version_tuple(self.kernel)  # a ValueError for a malformed version
        if self.guest_memfd_ioctl is None:
            object.__setattr__(self, "guest_memfd_ioctl", self.guest_memfd)
        if self.gmem_bind_wraps is None:
            # Accepted on 6.18 (this project's host), refused from 7.2 (the lab's 7.3).
            object.__setattr__(self, "gmem_bind_wraps",
                               not at_least(self.kernel, since("gmem-bind-uoff")))
        if self.gmem_bind_eexist is None:
            object.__setattr__(self, "gmem_bind_eexist",
                               at_least(self.kernel, since("gmem-bind-eexist")))
        if self.guest_memfd_flags is None:
            object.__setattr__(self, "guest_memfd_flags",
                               GMEM_FLAGS_ALL if self.guest_memfd_ioctl else 0)

    # -- derived ----------------------------------------------------------------------------
    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def user_mem_slots(self) -> int:
        """KVM_USER_MEM_SLOTS = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS."""
        return self.mem_slots_num - self.internal_mem_slots

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

    @property
    def has_dirty_ring(self) -> bool:
        return self.dirty_ring_tso or self.dirty_ring_acq_rel

    def at_least(self, version: str) -> bool:
        """True when the modelled kernel is ``version`` or newer."""
        return at_least(self.kernel, version)

    def replace(self, **changes: Any) -> Profile:
        """A copy with some fields changed (``name`` should change too)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["user_mem_slots"] = self.user_mem_slots
        return out


# ---------------------------------------------------------------------------------------------
# The versioned presets. Each builder turns (version, host kind) into facts; which release
# brought which fact is in memslot.versions (and docs/kernel-versions.md).
# ---------------------------------------------------------------------------------------------

#: Kernel versions with a preset, per kind (the Debian kernels the lab boots, the seed era,
#: and this project's own host).
X86_VERSIONS = ("5.6", "5.7", "5.10", "6.1", "6.12", "7.2", "7.3")
ARM64_VERSIONS = ("5.10", "6.1", "6.12", "7.2", "7.3")
ARM64_16K_VERSIONS = ("7.2", "7.3")
RISCV_VERSIONS = ("6.12", "7.2")
PPC_HV_VERSIONS = ("6.1", "6.12", "7.2", "7.3")

LA57_TASK_SIZE_MAX = (1 << 56) - 4096  # x86 TASK_SIZE_MAX with 5-level paging
L4_TASK_SIZE_MAX = 0x7FFFFFFFF000  # x86 TASK_SIZE_MAX with 4-level paging


def _generic(v: str) -> dict[str, Any]:
    """Facts of virt/kvm/kvm_main.c at version ``v`` (arch-independent)."""
    return dict(
        kernel=v,
        mem_slots_num=KVM_MEM_SLOTS_NUM if at_least(v, since("user-slots-32k")) else 512,
        user_memory2=at_least(v, since("region2")),
        manual_dirty_log_caps=3 if at_least(v, since("initially-set")) else 1,
        vcpu_id_u32=not at_least(v, since("vcpu-id-ulong")),
        vcpu_exists_first=at_least(v, since("vcpu-exists-first")),
    )


def _x86(v: str, kind: str) -> Profile:
    """x86-64. ``kind``: ``""`` = TDP (NPT) host with SMM as QEMU's q35 ``-cpu max`` runs
    Debian's kernels (MAXPHYADDR 40, 5-level paging); ``"shadow"`` = shadow paging."""
    tdp = kind == ""
    new_gmem = at_least(v, since("guest-memfd-any-vm"))
    bumped = at_least(v, since("x86-max-vcpus"))
    big_config = at_least(v, since("x86-max-vcpus-debian"))
    f = _generic(v)
    f.update(
        arch="x86",
        # SMM's second address space: unconditional before CONFIG_KVM_SMM (6.2), Debian sets it.
        nr_address_spaces=2,
        internal_mem_slots=3,  # APIC access page, identity page table, TSS (VMX)
        readonly_mem=True,
        tdp=tdp,
        phys_bits=40 if tdp else 52,
        max_gfn_check=at_least(v, since("x86-max-gfn")),
        tdp_mmu=tdp and at_least(v, since("lazy-rmaps")),
        # Write tracking: always before 5.16; Debian's KVMGT config keeps it on until the
        # per-VM policy of 6.9; then only shadow paging (not tdp) allocates it.
        external_write_tracking=not at_least(v, since("write-track-per-vm")),
        move_reallocates_arch=at_least(v, since("move-realloc-arch")),
        dirty_ring_tso=at_least(v, since("dirty-ring")),
        dirty_ring_acq_rel=at_least(v, since("dirty-ring-acq-rel")),
        guest_memfd=new_gmem,
        # CONFIG_KVM_PRIVATE_MEM (selected by KVM_AMD_SEV) gives 6.12..6.17 the ioctl,
        # without mmap flags.
        guest_memfd_ioctl=at_least(v, since("x86-private-mem")),
        guest_memfd_flags=GMEM_FLAGS_ALL if new_gmem else 0,
        # The same private-memory config builds the generic memory attributes (the lab's 7.3
        # answers 8 on /dev/kvm, 0 on a default VM).
        memory_attributes_system=8 if at_least(v, since("x86-private-mem")) else 0,
        # KVM_CAP_VM_TYPES: BIT(KVM_X86_DEFAULT_VM).
        vm_types=1 if at_least(v, since("x86-vm-types")) else 0,
        # Debian's 5.10 runs user space with 4-level paging; 6.1 and later with 5-level.
        user_addr_limit=(LA57_TASK_SIZE_MAX if at_least(v, since("x86-la57-debian"))
                        else L4_TASK_SIZE_MAX),
        # KVM_MAX_VCPUS 288 and KVM_MAX_VCPU_ID 1023 until "KVM: x86: Bump KVM_MAX_VCPUS to
        # 1024" (5.15); then 1024 and KVM_MAX_VCPU_IDS = 4 * 1024.
        # Debian's 6.12 and later build CONFIG_KVM_MAX_NR_VCPUS=4096 (ids: 4 * that).
        max_vcpus=4096 if big_config else 1024 if bumped else 288,
        max_vcpu_ids=16384 if big_config else 4096 if bumped else 1023,
    )
    era = {"5.6": " (the seed's era: MOVE keeps the arrays made for the old base)",
           "5.7": " (the MOVE fix: fresh arrays for the new base)"}.get(v, "")
    levels = 5 if at_least(v, since("x86-la57-debian")) else 4
    host = ("TDP (NPT) host with SMM: the lab's QEMU q35 -cpu max guest (MAXPHYADDR 40, "
            f"{levels}-level paging)" if tdp
            else f"shadow paging with SMM (two address spaces), {levels}-level paging")
    return Profile(name=f"x86_64{'-' + kind if kind else ''}@{v}",
                   description=f"Linux {v} x86-64, {host}{era}", **f)


def _x86_host() -> Profile:
    """This project's machines: a custom 6.18 build, shadow paging, no SMM (proven here)."""
    p = _x86("6.18", "shadow")
    return p.replace(
        name="x86_64-shadow@6.18", build="custom", nr_address_spaces=1,
        user_addr_limit=L4_TASK_SIZE_MAX,
        max_vcpus=1024, max_vcpu_ids=4096,
        memory_attributes_system=0,  # built without CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES
        description="Linux 6.18 x86-64 with shadow paging and no SMM (one address space), "
        "4-level paging: the kind of host memslot's CI runs (a custom build)")


def _arm64(v: str, kind: str) -> Profile:
    """arm64 under QEMU ``virt,virtualization=on -cpu max``: default VM type (40-bit IPA)."""
    gmem = at_least(v, since("arm64-guest-memfd"))
    ring = at_least(v, since("arm64-dirty-ring"))
    f = _generic(v)
    f.update(
        arch="arm64",
        page_shift=14 if kind == "16k" else 12,
        readonly_mem=True,
        unknown_ioctl_errno=errno.EINVAL,
        ipa_bits=40,
        ipa_limit=52 if at_least(v, since("arm64-lpa2")) else 48,
        user_addr_limit=1 << (52 if at_least(v, since("arm64-va52")) else 48),  # 1 << VA_BITS
        dirty_ring_acq_rel=ring,
        dirty_ring_with_bitmap=ring,
        guest_memfd=gmem,
        # KVM_MAX_VCPUS = VGIC_V3_MAX_CPUS; both caps answer kvm->max_vcpus (GICv3: 512).
        max_vcpus=512,
        max_vcpu_ids=512,
    )
    return Profile(name=f"arm64{'-' + kind if kind else ''}@{v}",
                   description=f"Linux {v} arm64, {'16' if kind == '16k' else '4'} KiB pages, "
                   "default VM type (40-bit IPA): slots past the IPA size fail EFAULT", **f)


def _riscv(v: str) -> Profile:
    """riscv64 under QEMU ``rv64,h=true``: Sv57 host paging, Sv57x4 G-stage (59-bit GPA)."""
    f = _generic(v)
    f.update(
        arch="riscv",
        unknown_ioctl_errno=errno.EINVAL,
        ipa_bits=59,
        # TASK_SIZE follows the paging mode the kernel picked at boot: Sv57 on the lab's
        # 6.12, Sv48 on its 7.2 (both measured).
        user_addr_limit=1 << (47 if at_least(v, since("riscv-sv48-lab")) else 56),
        max_vcpus=1024,  # KVM_MAX_VCPUS
        max_vcpu_ids=1024,  # KVM_MAX_VCPU_IDS defaults to KVM_MAX_VCPUS
        max_vcpu_id_cap=False,  # kvm_vm_ioctl_check_extension has no KVM_CAP_MAX_VCPU_ID
        manual_dirty_log_caps=3 if at_least(v, since("riscv-manual-caps")) else 1,
        dirty_ring_acq_rel=at_least(v, since("riscv-dirty-ring")),
    )
    return Profile(name=f"riscv64@{v}", description=f"Linux {v} riscv64, Sv57x4 G-stage "
                   "(59-bit GPA): slots reaching the GPA size fail EFAULT", **f)


def _ppc_hv(v: str) -> Profile:
    """POWER9 book3s HV (nested under QEMU pseries, cap-nested-hv)."""
    big = not at_least(v, since("ppc-4k-pages"))  # Debian ppc64el: 64 KiB pages up to 6.1
    f = _generic(v)
    f.update(
        arch="ppc-hv",
        page_shift=16 if big else 12,
        readonly_mem=False,
        user_addr_limit=1 << (52 if big else 46),  # TASK_SIZE_USER64: 4 PiB / 64 TiB
        access_ok_mask=at_least(v, since("ppc-access-ok-mask")),
        totalram_pages=1 << (14 if big else 18),  # a 1 GiB guest
        manual_dirty_log_caps=0,
        # KVM_MAX_VCPUS = NR_CPUS (Debian: 2048); ids: MAX_SMT_THREADS * KVM_MAX_VCORES.
        max_vcpus=2048,
        max_vcpu_ids=16384,
    )
    return Profile(name=f"ppc64-hv@{v}", description=f"Linux {v} POWER book3s HV "
                   f"({'64' if big else '4'} KiB pages): one rmap entry per page, carried "
                   "over on MOVE and FLAGS_ONLY; no read-only memory", **f)


_VERSIONED: tuple[Profile, ...] = (
    *(_x86(v, "") for v in X86_VERSIONS),
    *(_x86(v, "shadow") for v in X86_VERSIONS),
    _x86_host(),
    *(_arm64(v, "") for v in ARM64_VERSIONS),
    *(_arm64(v, "16k") for v in ARM64_16K_VERSIONS),
    *(_riscv(v) for v in RISCV_VERSIONS),
    *(_ppc_hv(v) for v in PPC_HV_VERSIONS),
)

#: Unversioned names: the newest preset of each kind (as of the kernels modelled here).
ALIASES: dict[str, str] = {
    "x86_64": "x86_64@7.3",
    "x86_64-shadow": "x86_64-shadow@6.18",
    "arm64": "arm64@7.3",
    "arm64-16k": "arm64-16k@7.3",
    "riscv64": "riscv64@7.2",
    "ppc64-hv": "ppc64-hv@7.3",
}

_UNVERSIONED_ONLY: tuple[Profile, ...] = (
    Profile(
        name="ppc64-pr",
        arch="ppc-pr",
        description="POWER book3s PR (64 KiB pages): no per-slot metadata (Debian builds no "
        "KVM-PR, so no real kernel backs this one)",
        page_shift=16,
        readonly_mem=False,
        user_addr_limit=1 << 52,
        manual_dirty_log_caps=0,
    ),
    Profile(
        name="s390x",
        arch="s390",
        description="s390x: 1 MiB aligned userspace_addr and size for CREATE/MOVE, "
        "mem_limit; no read-only memory (not bootable under TCG: no SIE)",
        readonly_mem=False,
        internal_mem_slots=1,  # "KVM: s390: fake memslot for ucontrol VMs" (2025)
        user_addr_limit=None,
        mem_limit=(1 << 64) - 4096,  # TASK_SIZE_MAX when sclp reports no HAMAX
        manual_dirty_log_caps=0,
    ),
)


def _aliased(alias: str, target: Profile) -> Profile:
    return target.replace(name=alias, description=f"= {target.name}: {target.description}")


_BY_NAME = {p.name: p for p in _VERSIONED}
PRESETS: dict[str, Profile] = {
    **{alias: _aliased(alias, _BY_NAME[target]) for alias, target in ALIASES.items()},
    **{p.name: p for p in _UNVERSIONED_ONLY},
    **_BY_NAME,
}

#: The versioned presets only (``memslot compat`` replays on each).
VERSIONED_PRESETS: dict[str, Profile] = dict(_BY_NAME)

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
