"""What changed in KVM_SET_USER_MEMORY_REGION handling, by kernel version.

Each :class:`Change` is one fact that differs between kernels: the release that brought it,
the kernel function (or header) it lives in, the commit title, and where it was confirmed.
The versioned presets in :mod:`memslot.profile` are built from these facts, ``memslot
compat`` names the release where a refusing rule changes, and ``docs/kernel-versions.md``
is the same table for people.
"""

from __future__ import annotations

from typing import NamedTuple


class Change(NamedTuple):
    """One behaviour change: ``key`` is what profiles and rules refer to."""

    key: str
    since: str  # first release with the new behaviour, "X.Y"
    function: str
    title: str
    what: str
    confirmed: str  # where the before/after was read or measured


def version_tuple(version: str) -> tuple[int, int]:
    """``"6.12"`` (or ``"6.12.117-1"``, ``"7.3~rc7"``) -> ``(6, 12)``."""
    parts = version.replace("~", ".").replace("-", ".").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise ValueError(f"not a kernel version: {version!r}") from None


def at_least(version: str, since: str) -> bool:
    return version_tuple(version) >= version_tuple(since)


CHANGES: dict[str, Change] = {c.key: c for c in (
    Change("move-realloc-arch", "5.7", "kvm_arch_prepare_memory_region (x86)",
           "KVM: x86: Allocate new rmap and large page tracking when moving memslot",
           "x86 MOVE allocates rmap/lpage_info for the new base and frees the old arrays; "
           "before, the arrays sized and marked for the old base were kept (reads past their "
           "end, stale disallow_lpage marks)",
           "patch mail 20200121223157.15263-2 (v5 01/19), merged for 5.7 (edd4fa37baa6)"),
    Change("initially-set", "5.7", "kvm_vm_ioctl_enable_cap_generic",
           "KVM: x86: enable dirty log gradually in small chunks",
           "KVM_DIRTY_LOG_INITIALLY_SET joins KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (caps 1 -> 3)",
           "kernel-history notes (3c9bd4006bfc); 5.10.223 source has it"),
    Change("dirty-ring", "5.11", "kvm_vm_ioctl_enable_dirty_log_ring",
           "KVM: Dirty ring support (x86)", "KVM_CAP_DIRTY_LOG_RING on x86",
           "absent in 5.10.223 arch/x86/kvm/Kconfig, present in 6.1.176"),
    Change("user-slots-32k", "5.12", "kvm_vm_ioctl_set_memory_region / KVM_USER_MEM_SLOTS",
           "KVM: Raise the maximum number of user memslots",
           "KVM_MEM_SLOTS_NUM becomes SHRT_MAX: user slots 509 -> 32764 on x86, 512 -> 32767 "
           "on arm64 and ppc, 32 -> 32767 on s390",
           "5.10.223 kvm_host.h (x86 509+3, arm64 512, ppc 512, s390 32); 6.1.176 SHRT_MAX"),
    Change("lazy-rmaps", "5.14", "kvm_memslots_have_rmaps",
           "KVM: x86/mmu: Lazily allocate memslot rmaps",
           "with the TDP MMU rmaps are allocated at the first shadow root, not per slot",
           "5.10.223 kvm_alloc_memslot_metadata allocates rmaps always; 6.1.176 lazily"),
    Change("x86-max-vcpus", "5.15", "kvm_vm_ioctl_check_extension (x86)",
           "KVM: x86: Bump KVM_MAX_VCPUS to 1024",
           "KVM_CAP_MAX_VCPUS 288 -> 1024, KVM_CAP_MAX_VCPU_ID 1023 -> 4096",
           "5.10.223 and 6.1.176 kvm_host.h; lab amd64 5.10 answers 288 / 1023"),
    Change("x86-la57-debian", "6.1", "Debian amd64 config",
           "Debian: user space with 5-level paging",
           "TASK_SIZE_MAX 2^56 - 4096 for access_ok (2^47 - 4096 before)",
           "lab amd64 5.10 (2^47 - 4096) and 6.1 (2^56 - 4096)"),
    Change("write-track-config", "5.16", "kvm_page_track_write_tracking_enabled",
           "KVM: x86: only allocate gfn_track when necessary",
           "TDP hosts allocate the 2-byte-per-page write-track array only with shadow roots "
           "or CONFIG_KVM_EXTERNAL_WRITE_TRACKING (which Debian's KVMGT build selects)",
           "5.10.223 page_track.c allocates always; 6.1.176 IS_ENABLED(CONFIG_...)"),
    Change("write-track-per-vm", "6.6", "kvm_page_track_write_tracking_enabled",
           "KVM: x86: Enable write tracking on-demand for external users (KVMGT series)",
           "external write tracking becomes per VM (enabled when KVMGT registers): a TDP "
           "VM without KVMGT no longer allocates write-track arrays even on Debian's config",
           "6.1.176 static config; 6.12.117 kvm->arch.external_write_tracking_enabled; "
           "lab VmallocUsed (issue 12: 6.1 +512 KiB/GiB, 6.12 none)"),
    Change("x86-max-gfn", "5.18", "kvm_arch_prepare_memory_region (x86)",
           "KVM: x86/mmu: Do not create SPTEs for GFNs that exceed host.MAXPHYADDR",
           "CREATE/MOVE whose last gfn exceeds kvm_mmu_max_gfn() fails EINVAL",
           "absent in 5.10.223, present in 6.1.176; 86931ff7207b in 5.18-rc5 (failed to "
           "apply to 5.15-stable)"),
    Change("arm64-dirty-ring", "6.2", "arch/arm64/kvm/Kconfig",
           "KVM: arm64: Enable ring-based dirty memory tracking",
           "arm64 gets the ACQ_REL dirty ring with KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP",
           "absent in 6.1.176 arm64 Kconfig, present in 6.12.117"),
    Change("region2", "6.8", "kvm_vm_ioctl",
           "KVM: Add KVM_SET_USER_MEMORY_REGION2 (guest_memfd series)",
           "KVM_SET_USER_MEMORY_REGION2 and KVM_CAP_USER_MEMORY2; before it the ioctl is "
           "unknown (ENOTTY on x86/ppc/s390, EINVAL on arm64/riscv); the v1 ioctl refuses "
           "flags outside LOG_DIRTY_PAGES|READONLY first",
           "absent in 6.1.176, present in 6.12.117"),
    Change("guest-memfd-any-vm", "6.18", "check_memory_region_flags",
           "KVM: guest_memfd: usable by every VM type (guest_memfd mmap series)",
           "KVM_MEM_GUEST_MEMFD valid on every VM (CONFIG_KVM_GUEST_MEMFD); before it only on "
           "VM types with private memory (not the default x86 VM), never on arm64/riscv",
           "6.12.117 kvm_arch_has_private_mem(kvm); 7.2.13 IS_ENABLED(CONFIG_KVM_GUEST_MEMFD)"),
    Change("arm64-guest-memfd", "6.18", "kvm_arch_prepare_memory_region (arm64)",
           "KVM: arm64: Enable support for guest_memfd backed memory",
           "arm64 selects KVM_GUEST_MEMFD; guest_memfd slots must be mmap-able (gmem-only)",
           "absent in 6.12.117, present in 7.2.13"),
    Change("gmem-bind-uoff", "7.2", "kvm_gmem_bind",
           "KVM: guest_memfd: use an unsigned offset type for bindings",
           "offset + size is computed in uoff_t: a range reaching 2^63 no longer wraps "
           "negative past the file-size check (EINVAL)",
           "6.12.117 loff_t offset; 7.2.13 and 7.3-rc7 uoff_t; this host's 6.18 accepts the "
           "wrap (the release in between is not pinned)"),
    Change("gmem-bind-eexist", "7.2", "kvm_gmem_bind",
           "KVM: guest_memfd: EEXIST for a range already bound",
           "binding a guest_memfd range that another slot holds fails EEXIST (was EINVAL)",
           "6.12.117 r = -EINVAL for a bound range; 7.2.13 and 7.3-rc7 r = -EEXIST; this "
           "host's 6.18 answers EINVAL; lab amd64 7.3 answered EEXIST to the fuzzer (the "
           "release in between is not pinned)"),
    Change("riscv-manual-caps", "7.2", "arch/riscv/include/asm/kvm_host.h",
           "RISC-V: KVM: KVM_DIRTY_LOG_INITIALLY_SET",
           "riscv's KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 answers 3 (was 1)",
           "6.12.117 generic KVM_DIRTY_LOG_MANUAL_CAPS; 7.2.13 riscv defines both bits "
           "(the release in between is not pinned); lab riscv64 6.12 answers 1 (issue 12)"),
    Change("riscv-dirty-ring", "7.2", "arch/riscv/kvm/Kconfig",
           "RISC-V: KVM: Enable ring-based dirty memory tracking",
           "riscv gets the ACQ_REL dirty ring",
           "absent in 6.12.117, present in 7.2.13 (the release in between is not pinned)"),
    Change("ppc-access-ok-mask", "7.2", "__access_ok (arch/powerpc/include/asm/uaccess.h)",
           "powerpc/uaccess: a simpler __access_ok for ppc64",
           "address and size each below TASK_SIZE_MAX; the range may end past it",
           "6.1.176 / 6.12.117 generic, 7.2.13 / 7.3-rc7 powerpc's (release in between not "
           "pinned); lab ppc64el 7.2"),
    Change("ppc-4k-pages", "6.12", "Debian ppc64el config",
           "Debian: ppc64el kernels use 4 KiB pages",
           "Debian's ppc64el kernel builds 4 KiB pages (64 TiB user range) instead of 64 KiB "
           "(4 PiB): memslot sizes, alignment and the access_ok limit follow",
           "lab ppc64el 6.1 vs 6.12 (issue 12)"),
    Change("arm64-va52", "6.12", "Debian arm64 config (CONFIG_ARM64_VA_BITS_52)",
           "Debian: arm64 kernels with 52-bit virtual addresses",
           "TASK_SIZE_MAX = 2^52 for access_ok (2^48 before)", "lab arm64 5.10 vs 6.12 "
           "(issue 12)"),
)}


#: The release named by a refusing rule's ``changes_in`` (``memslot compat``): rule code ->
#: change key. Rules absent here are the same on every modelled kernel.
RULE_CHANGES: dict[str, str] = {
    "user-slot-id": "user-slots-32k",
    "as-id": "user-slots-32k",
    "x86-max-gfn": "x86-max-gfn",
    "region2-missing": "region2",
    "v1-flags": "region2",
    "flags": "guest-memfd-any-vm",
    "gmem-unsupported": "guest-memfd-any-vm",
    "arm64-gmem-only": "arm64-guest-memfd",
    "ring-unsupported": "dirty-ring",
    "gmem-bound": "gmem-bind-eexist",
}


__all__ = ["CHANGES", "RULE_CHANGES", "Change", "at_least", "version_tuple"]
